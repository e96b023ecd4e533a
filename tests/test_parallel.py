"""Data parallelism on Ray: a local cluster of two workers, each owning a vLLM engine of the
bundled model, gives what one engine gives.

Every job's prompts are split between the two engines and joined back in order; a
seeded sample keeps its row's seed; a streamed run writes the same results; and a
sweep of graphs shares both engines' batches.
"""

from __future__ import annotations

import pytest
import torch

from nnterp.dsl import Lens, Read, Sampling, Steer, run, run_batch
from nnterp.dsl.recorded import BlockValues, KeyedValues, join_recorded
from nnterp.dsl.plan import OutputKey
from backend_settings import engine_kwargs
from test_dsl_run import _compare

PROMPTS = [f"The capital of country number {i} is" for i in range(7)]


def _same(got, want, what):
    assert got.tokens == want.tokens, f"{what}: tokens"
    assert got.keys() == want.keys()
    for name in want.keys():
        _compare(got[name], want[name], f"{what} {name!r}")


@pytest.fixture(scope="module")
def ray_model():
    ray = pytest.importorskip("ray")
    pytest.importorskip("vllm")
    from nnterp.parallel import DataParallel

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 2**20, log_to_driver=False)
    model = None
    try:
        model = DataParallel.on_ray("bundled", replicas=2, num_gpus=0, backend="vllm", quiet=True, **engine_kwargs())
        yield model
    finally:
        if model is not None:
            model.close()
        ray.shutdown()


@pytest.mark.vllm
@pytest.mark.slow
def test_two_ray_workers_give_what_one_engine_gives(ray_model, vllm_models, tmp_path):
    single = vllm_models("bundled")
    assert len(ray_model.replicas) == 2 and ray_model.num_layers == single.num_layers
    v = 0.3 * torch.randn(single.hidden_size, generator=torch.Generator().manual_seed(0))
    reads = Lens(top_k=5) >> Read("layers[10].output", positions=[0, -1]) >> Read("layers[20].output", positions=None)
    _same(run(reads, ray_model, PROMPTS), run(reads, single, PROMPTS), "reads")
    greedy = Sampling(max_tokens=6)
    _same(run(Steer(5, v, scale=4.0) >> Read("logits", steps="all", positions=[-1]), ray_model, PROMPTS,
              sampling=greedy),
          run(Steer(5, v, scale=4.0) >> Read("logits", steps="all", positions=[-1]), single, PROMPTS,
              sampling=greedy), "steer")
    # each prompt keeps its row's seed, whichever engine runs it
    seeded = Sampling(max_tokens=6, temperature=1.0, seed=4)
    copies = [PROMPTS[0]] * 5
    assert run(Read("logits"), ray_model, copies, sampling=seeded).tokens == \
        run(Read("logits"), single, copies, sampling=seeded).tokens
    # a sweep of graphs and uneven jobs
    jobs = [(Steer(3, v, scale=s), PROMPTS[:3], greedy) for s in (1.0, 2.0, 8.0)] + [(reads, PROMPTS[:1])]
    for i, (got, want) in enumerate(zip(run_batch(jobs, ray_model), run_batch(jobs, single))):
        _same(got, want, f"jobs[{i}]")
    # streamed to disk a shard at a time, each shard split between the workers
    stored = run(reads, ray_model, iter(PROMPTS), out=tmp_path / "dp", shard_prompts=3, progress=False)
    _same(stored, run(reads, single, PROMPTS), "streamed")


def test_parts_of_a_run_join_back_in_order():
    from nnterp.dsl.recorded import Block

    def block(prompts):
        import numpy as np

        meta = np.array([(p, 0, o) for p in prompts for o in range(2)], dtype=np.int64)
        return Block("r", None, False, meta, torch.tensor([[float(p * 10 + o)] for p, o in meta[:, [0, 2]].tolist()]))

    first, second = BlockValues([block([0, 1])]), BlockValues([block([0, 1, 2])])
    joined = join_recorded([(0, first), (2, second)])
    assert joined.stacked("r", None, 0, 5)[:, :, 0].tolist() == [[0, 1], [10, 11], [0, 1], [10, 11], [20, 21]]
    keyed = join_recorded([(0, KeyedValues({OutputKey("x", step=0, prompt=0): torch.ones(1)})),
                           (1, KeyedValues({OutputKey("x", step=0, prompt=0): torch.zeros(1)}))])
    assert keyed[OutputKey("x", step=0, prompt=1)].item() == 0.0
