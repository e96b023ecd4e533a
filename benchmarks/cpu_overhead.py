"""Overhead of ``nnterp.dsl.run`` against hand-written nnsight code doing the same work.

On the bundled SmolLM2, for each backend (HF, vLLM on CPU), two workloads, each timed
for the DSL and for the equivalent hand-written nnsight trace, interleaved, median of
``--repeats`` runs:

* lens: the logit lens over all 30 layers at the last position, top-5, for 8 prompts;
* steer: a vector added to layer 15's output at every position and every generated
  token, 8 new tokens greedy, for 4 prompts.

Prints a table of seconds and the ratio DSL / hand-written (1.00 = no overhead).
Run: ``make bench`` or ``python -m benchmarks.cpu_overhead [--repeats N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import nnsight
import torch

PROMPTS = ["The capital of France is", "One, two, three,", "The quick brown fox", "In 1492, Columbus",
           "Water boils at", "The opposite of hot is", "My favourite colour is", "Paris is the capital of"]


def lens_dsl(model, prompts):
    from nnterp.dsl import Lens, run

    return run(Lens(top_k=5), model, prompts)["lens"]


def lens_hand_hf(model, prompts):
    values, ids = [], []
    with torch.no_grad(), model.generate(prompts, max_tokens=1):
        for i in range(model.num_layers):
            probs = torch.softmax(model.project_on_vocab(model.layers_output[i][:, -1]).float(), dim=-1)
            top = probs.topk(5, dim=-1)
            values.append(top.values.cpu().save())
            ids.append(top.indices.cpu().save())
    return torch.stack(values, 1), torch.stack(ids, 1)


def lens_hand_vllm(model, prompts):
    with model.generate(max_tokens=1) as tracer:
        store = nnsight.save({})
        for row, prompt in enumerate(prompts):
            with tracer.invoke(prompt):
                for i in range(model.num_layers):
                    probs = torch.softmax(model.project_on_vocab(model.layers_output[i][:, -1]).float(), dim=-1)
                    top = probs.topk(5, dim=-1)
                    store[(row, i)] = (top.values.cpu(), top.indices.cpu())
    return store


def steer_dsl(model, prompts, vector):
    from nnterp.dsl import Sampling, Steer, run

    return run(Steer(15, vector), model, prompts, sampling=Sampling(max_tokens=8)).tokens


def steer_hand_hf(model, prompts, vector):
    with torch.no_grad(), model.generate(prompts, max_tokens=8) as tracer:
        for step in tracer.iter[:8]:
            model.layers_output[15] = model.layers_output[15] + vector
        ids = tracer.result.save()
    return ids


def steer_hand_vllm(model, prompts, vector):
    with model.generate(max_tokens=8) as tracer:
        store = nnsight.save({})
        for row, prompt in enumerate(prompts):
            with tracer.invoke(prompt):
                for step in tracer.iter[:8]:
                    model.layers_output[15] = model.layers_output[15] + vector
                store[row] = list(tracer.result.outputs[0].token_ids)
    return store


def _time(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", default="hf,vllm")
    args = parser.parse_args()
    from nnterp import StandardizedTransformer

    vector = 0.5 * torch.randn(576, generator=torch.Generator().manual_seed(0))
    rows = []
    for backend in args.backends.split(","):
        dtype = torch.float32 if backend == "hf" else "float32"
        with StandardizedTransformer("bundled", backend=backend, dtype=dtype) as model:
            hand = {"lens": lens_hand_hf if backend == "hf" else lens_hand_vllm,
                    "steer": steer_hand_hf if backend == "hf" else steer_hand_vllm}
            workloads = {
                "lens (8 prompts, 30 layers, top-5)": (lambda: lens_dsl(model, PROMPTS),
                                                       lambda: hand["lens"](model, PROMPTS)),
                "steer (4 prompts, 8 tokens)": (lambda: steer_dsl(model, PROMPTS[:4], vector),
                                                lambda: hand["steer"](model, PROMPTS[:4], vector)),
            }
            for name, (dsl, handwritten) in workloads.items():
                dsl(), handwritten()  # warm-up
                dsl_times, hand_times = [], []
                for _ in range(args.repeats):
                    dsl_times.append(_time(dsl))
                    hand_times.append(_time(handwritten))
                d, h = statistics.median(dsl_times), statistics.median(hand_times)
                rows.append((backend, name, d, h, d / h))
    print(f"torch {torch.__version__}, nnsight {nnsight.__version__}, {args.repeats} repeats, median seconds")
    print(f"{'backend':<8}{'workload':<38}{'dsl':>8}{'hand':>8}{'dsl/hand':>10}")
    for backend, name, d, h, ratio in rows:
        print(f"{backend:<8}{name:<38}{d:>8.3f}{h:>8.3f}{ratio:>10.2f}")


if __name__ == "__main__":
    main()
