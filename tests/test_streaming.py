"""Streamed runs: results on disk a shard at a time, read back lazily, resumed after a kill.

A streamed run must give what the same run gives in memory, with the same keys and
shapes; its input may be any iterable, a file or a dataset column; and a directory
holds one run only: a run that differs in anything (graph, model, sampling, input,
shard size) is refused before it touches the directory, and the same run resumes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from nnterp.activations import collect_token_activations_batched, get_token_activations
from nnterp.dsl import (Lens, Read, ResultsError, Sampling, Steer, ValidationError, open_results, run,
                        run_batch)
from nnterp.dsl.stored import INDEX
from test_dsl_run import _compare

PROMPTS = [f"Item {i}: the {'quick brown fox ' * (i % 3)}jumps over" for i in range(23)]
GRAPH = (Read("layers[1].output") >> Read("layers[2].output", positions=None)
         >> Lens(top_k=4, positions=[0, -1]) >> Read("logits", positions=[-1], steps="all"))
SAMPLING = Sampling(max_tokens=3)


def _same_as_in_memory(stored, whole):
    assert stored.keys() == whole.keys()
    for name in whole.keys():
        _compare(stored[name], whole[name], name)
    assert stored.tokens == whole.tokens and stored.texts == whole.texts


@pytest.mark.parametrize("backend", ["hf", pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.slow])])
def test_a_streamed_run_equals_the_same_run_in_memory(backend, hf_models, vllm_models, tmp_path):
    model = hf_models("llama") if backend == "hf" else vllm_models("llama")
    stored = run(GRAPH, model, iter(PROMPTS), sampling=SAMPLING, out=tmp_path / "run", shard_prompts=5,
                 progress=False)
    assert stored.complete and len(stored) == len(PROMPTS) and stored.prompts == PROMPTS
    assert len(sorted((tmp_path / "run").glob("shard-*.safetensors"))) == 5  # 23 prompts, 5 a shard
    _same_as_in_memory(stored, run(GRAPH, model, PROMPTS, sampling=SAMPLING))
    # read again from the directory alone, as a colleague would
    again = open_results(tmp_path / "run")
    assert torch.equal(again["layers[1].output"], stored["layers[1].output"])
    assert again.manifest["graph_digest"] == GRAPH.digest() and again.manifest["backend"] == backend
    # the loader: every row once, one shard in memory at a time
    rows = torch.cat(list(again.batches("layers[1].output", batch_size=4, shuffle=True, seed=1)))
    assert rows.shape == again["layers[1].output"].shape
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, again["layers[1].output"].tolist()))
    with pytest.raises(TypeError, match="read it with shards"):
        next(again.batches("layers[2].output", batch_size=4))
    if backend == "vllm":  # each request samples with its row's seed, whichever shard it is in
        seeded = Sampling(max_tokens=4, temperature=1.0, seed=5)
        copies = [PROMPTS[0]] * 7
        streamed = run(Read("logits"), model, copies, sampling=seeded, out=tmp_path / "seeded", shard_prompts=3,
                       progress=False)
        assert streamed.tokens == run(Read("logits"), model, copies, sampling=seeded).tokens
    # no input at all: refused, and the directory is left as it was
    with pytest.raises(ValueError, match="at least one prompt"):
        run(GRAPH, model, iter([]), out=tmp_path / "empty", progress=False)
    assert not (tmp_path / "empty" / INDEX).exists()


def test_several_graphs_and_jobs_stream_too(hf_models, tmp_path):
    model = hf_models("llama")
    v = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(0))
    graphs = [GRAPH, Steer(1, v) >> Read("layers[2].output")]
    stored = run(graphs, model, PROMPTS, sampling=SAMPLING, out=tmp_path / "graphs", shard_prompts=8, progress=False)
    for one, whole in zip(stored, run(graphs, model, PROMPTS, sampling=SAMPLING)):
        _same_as_in_memory(one, whole)
    assert stored[1].manifest["graph_digest"] == graphs[1].digest()
    jobs = [(Steer(1, v * (i % 4)) >> Read("logits"), [prompt], SAMPLING) for i, prompt in enumerate(PROMPTS)]
    streamed = run_batch((job for job in jobs), model, out=tmp_path / "jobs", shard_prompts=6, progress=False)
    assert len(streamed) == len(jobs)
    for i, (one, whole) in enumerate(zip(streamed, run_batch(jobs, model))):
        _same_as_in_memory(one, whole)
        assert one.manifest["prompts"] == [PROMPTS[i]] and one.manifest["batch"]["job"] == i
    assert [r.tokens for r in streamed[-3:]] == [r.tokens for r in streamed[len(jobs) - 3:]]


def test_prompts_come_from_text_and_jsonl_files_and_dataset_like_columns(hf_models, tmp_path):
    model = hf_models("llama")
    text, jsonl = tmp_path / "prompts.txt", tmp_path / "prompts.jsonl"
    text.write_text("\n".join(PROMPTS[:4]) + "\n\n")
    lines = [json.dumps(PROMPTS[0]), json.dumps({"prompt": PROMPTS[1]}), json.dumps({"text": PROMPTS[2], "id": 3})]
    jsonl.write_text("\n".join(lines) + "\n")
    assert run(Read("logits"), model, text).manifest["prompts"] == PROMPTS[:4]
    assert run(Read("logits"), model, jsonl).manifest["prompts"] == PROMPTS[:3]
    stored = run(Read("logits"), model, text, out=tmp_path / "out", shard_prompts=3, progress=False)
    assert stored.prompts == PROMPTS[:4]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"body": "no"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: a JSON object needs a 'prompt' or 'text' field, it has 'body'"):
        run(Read("logits"), model, bad)
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        run(Read("logits"), model, bad, out=tmp_path / "bad", progress=False)
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({"text": PROMPTS[:5], "id": list(range(5))})
    column = run(Read("layers[0].output"), model, dataset["text"], out=tmp_path / "column", shard_prompts=2,
                 progress=False)
    assert column.prompts == PROMPTS[:5] and column["layers[0].output"].shape[0] == 5
    with pytest.raises(TypeError, match=r"a dataset iterates rows: pass one column, dataset\['text'\]"):
        run(Read("logits"), model, dataset)
    with pytest.raises(TypeError, match=r"prompts\[2\] is ''"):
        run(Read("logits"), model, iter(["a", "b", ""]), out=tmp_path / "empty", progress=False)


def test_a_directory_is_resumed_only_by_the_run_that_wrote_it(hf_models, tmp_path):
    model = hf_models("llama")
    out = tmp_path / "run"
    stored = run(GRAPH, model, PROMPTS, sampling=SAMPLING, out=out, shard_prompts=5, progress=False)
    index = (out / INDEX).read_text()
    # the same run again: nothing runs, nothing changes
    assert run(GRAPH, model, PROMPTS, sampling=SAMPLING, out=out, shard_prompts=5, progress=False).complete
    assert (out / INDEX).read_text() == index
    refused = {
        "graphs": dict(graph=Read("layers[0].output")),
        "sampling": dict(sampling=Sampling(max_tokens=2)),
        "shard size": dict(shard_prompts=6),
        "for other prompts: shard 1 \\(prompts 5 .. 9\\)": dict(prompts=PROMPTS[:6] + ["changed"] + PROMPTS[7:]),
        "input ended after 23 prompts": dict(prompts=PROMPTS + ["one more"]),
        "model \\(configuration and weights digests\\)": dict(model=hf_models("qwen2")),
    }
    for what, change in refused.items():
        arguments = dict(graph=GRAPH, model=model, prompts=PROMPTS, sampling=SAMPLING, shard_prompts=5)
        arguments.update(change)
        with pytest.raises(ResultsError, match=what):
            run(arguments.pop("graph"), arguments.pop("model"), arguments.pop("prompts"), out=out,
                progress=False, **arguments)
    assert (out / INDEX).read_text() == index and stored.complete
    jobs = [(GRAPH, PROMPTS[:3], SAMPLING), (Read("layers[0].output"), PROMPTS[3:5])]
    run_batch(jobs, model, out=tmp_path / "jobs", shard_prompts=2, progress=False)
    with pytest.raises(ResultsError, match=r"other jobs \(graphs, sampling or prompts\)"):
        run_batch([jobs[0], (Read("layers[1].output"), PROMPTS[3:5])], model, out=tmp_path / "jobs",
                  shard_prompts=2, progress=False)
    (out / "shard-00002.safetensors").unlink()
    with pytest.raises(ResultsError, match="names 1 shard"):
        run(GRAPH, model, PROMPTS, sampling=SAMPLING, out=out, shard_prompts=5, progress=False)
    with pytest.raises(ResultsError, match="no index.json"):
        open_results(tmp_path)


def test_problems_are_found_before_a_shard_is_written_and_name_the_prompts(hf_models, tmp_path):
    model = hf_models("llama")
    with pytest.raises(ValidationError, match=r"nodes\[0\] Read.site"):
        run(Read("layers[9].output"), model, iter(PROMPTS), out=tmp_path / "a", progress=False)
    assert not (tmp_path / "a" / INDEX).exists()
    prompts = PROMPTS[:6] + ["Hi"]  # too short for position 3
    with pytest.raises(ValidationError, match=r"prompts 5 .. 6 of the input"):
        run(Read("layers[0].output", positions=[3]), model, prompts, out=tmp_path / "b", shard_prompts=5,
            progress=False)
    assert json.loads((tmp_path / "b" / INDEX).read_text())["prompts"] == 5  # the first shard stands


def test_the_collector_streams_to_disk(hf_models, tmp_path):
    model = hf_models("llama")
    stored = collect_token_activations_batched(model, iter(PROMPTS), layers=[0, 2], out=tmp_path / "acts",
                                               shard_prompts=10, progress=False)
    whole = get_token_activations(model, PROMPTS, layers=[0, 2])
    assert torch.allclose(torch.stack([stored["layer0"], stored["layer1"]]), whole, atol=1e-5)


_KILLED = textwrap.dedent("""
    import sys
    from nnterp import StandardizedTransformer
    from nnterp.dsl import Read, Lens, run

    if __name__ == "__main__":
        model = StandardizedTransformer("bundled", backend="hf", quiet=True)
        prompts = [line for line in open(sys.argv[2]).read().splitlines() if line]
        graph = Read("layers[3].output") >> Lens(top_k=5, layers=[0, -1])
        run(graph, model, prompts, out=sys.argv[1], shard_prompts=8, progress=False)
""")


@pytest.mark.slow
def test_a_run_killed_mid_way_resumes_and_gives_the_uninterrupted_results(hf_models, tmp_path):
    """SIGKILL after a few shards, start again: the results equal, bit for bit, those of
    a run never interrupted."""
    prompts = [f"Sentence {i} says that the weather in town number {i % 7} is" for i in range(96)]
    source = tmp_path / "prompts.txt"
    source.write_text("\n".join(prompts) + "\n")
    script = tmp_path / "collect.py"
    script.write_text(_KILLED)
    out = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, str(script), str(out), str(source)])
    deadline = time.time() + 240
    try:
        while time.time() < deadline and child.poll() is None:
            index = out / INDEX
            if index.exists() and len(json.loads(index.read_text())["shards"]) >= 3:
                break
            time.sleep(0.02)
        assert child.poll() is None, "the run ended before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    killed = json.loads((out / INDEX).read_text())
    assert not killed["complete"] and 3 <= len(killed["shards"]) < 12
    model = hf_models("bundled")
    graph = Read("layers[3].output") >> Lens(top_k=5, layers=[0, -1])
    resumed = run(graph, model, Path(source), out=out, shard_prompts=8, progress=False)
    straight = run(graph, model, prompts, out=tmp_path / "straight", shard_prompts=8, progress=False)
    assert resumed.complete and len(resumed) == 96
    assert torch.equal(resumed["layers[3].output"], straight["layers[3].output"])
    assert all(torch.equal(a, b) for a, b in zip(resumed["lens"], straight["lens"]))
    assert resumed.tokens == straight.tokens and resumed.prompts == prompts
    assert not list(out.glob(".tmp-*"))
