"""Streamed collection (issue 21): its rate against vanilla vLLM, its memory against its size.

Workload: the last-token residual stream of 4 layers, for prompts of 32 tokens, streamed to
disk with ``run(graph, model, prompts, out=DIR)``. The prompts come from a generator, so
the input is never a list in memory either. Each measurement runs in a process of its
own, and reports the peak RSS of that (client) process:

* ``stream``: nnterp on N prompts: prompts/s, peak RSS;
* ``stream-tenth``: the same on N/10 prompts: ``stream``'s peak RSS must stay within 1.2x
  of this one's (memory does not grow with the number of prompts);
* ``vanilla``: vanilla vLLM at its best on ``--vanilla`` of the same prompts (token ids,
  one generated token, ``detokenize=False``, one shared ``skip_clone`` params), keeping
  nothing: prompts/s. The target: ``stream`` at least 0.8x of it.

Presets: ``1b`` (a random-weight TinyLlama-shaped model, bfloat16, 1M prompts: 16 GB of
activations, on an H200); ``cpu`` (the bundled SmolLM2, 4,000 prompts: what this
machine can run in minutes). Run: ``python -m benchmarks.streaming --preset cpu``.
Results: ``OUT/streaming-<preset>.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

PRESETS = {
    "1b": dict(model="1b", dtype="bfloat16", prompts=1_000_000, vanilla=65_536, shard=32_768, layers=4),
    "cpu": dict(model="bundled", dtype="float32", prompts=4_000, vanilla=1_000, shard=500, layers=4),
}
LENGTH = 32


def _words(tokenizer: Any) -> list[str]:
    """Words that are one token each with their leading space: 32 of them are 32 tokens."""
    words = []
    for i in range(min(len(tokenizer), 20000)):
        text = tokenizer.decode([i])
        if len(text) > 3 and text[0] == " " and text[1:].isalpha() and text[1:].islower() and \
                tokenizer(text, add_special_tokens=False)["input_ids"] == [i]:
            words.append(text)
    return words


def prompts(words: list[str], n: int, seed: int = 0) -> Iterator[str]:
    rng = random.Random(seed)
    for _ in range(n):
        yield "".join(rng.choice(words) for _ in range(LENGTH))


def _model_path(preset: dict, models: Path, tokenizer: Path | None) -> Path:
    import nnterp

    if preset["model"] == "bundled":
        return Path(nnterp.bundled_model_path())
    from benchmarks.throughput import build_model

    return build_model(preset["model"], models / f"llama-{preset['model']}",
                       tokenizer or Path(nnterp.bundled_model_path()))


def _engine(preset: dict) -> dict:
    import torch

    kwargs: dict[str, Any] = dict(dtype=preset["dtype"])
    if torch.cuda.is_available():
        kwargs.update(gpu_memory_utilization=0.45, max_model_len=512)
    return kwargs


def child(what: str, preset: dict, n: int, path: Path, out: Path) -> dict:
    """One measurement, in this process: rate and peak RSS."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    words = _words(tokenizer)
    if what == "vanilla":
        from vllm import LLM, SamplingParams

        kwargs = _engine(preset)
        import torch

        if not torch.cuda.is_available():
            from nnterp.backends.vllm_cpu import cpu_engine_kwargs

            kwargs = cpu_engine_kwargs(**kwargs)
        kwargs["enable_prefix_caching"] = False
        llm = LLM(str(path), **kwargs)
        ids = [{"prompt_token_ids": tokenizer(p)["input_ids"]} for p in prompts(words, n)]
        params = SamplingParams(temperature=0.0, max_tokens=1, detokenize=False, skip_clone=True)
        llm.generate(ids[:64], params, use_tqdm=False)  # warm-up
        start = time.perf_counter()
        llm.generate(ids, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    else:
        from nnterp import StandardizedTransformer
        from nnterp.dsl import Graph, Read, run

        import torch

        # on a GPU the compiled engine that replays CUDA graphs, as vanilla vLLM's: the
        # residual stream, all this run reads, is served there
        model = StandardizedTransformer(path, backend="vllm", quiet=True, cuda_graphs=torch.cuda.is_available(),
                                        **_engine(preset))
        layers = model.num_layers
        picked = [round(k * (layers - 1) / (preset["layers"] - 1)) for k in range(preset["layers"])]
        graph = Graph(tuple(Read(f"layers[{i}].output") for i in picked))
        run(graph, model, list(prompts(words, 64, seed=1)))  # warm-up
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        stored = run(graph, model, prompts(words, n), out=out, shard_prompts=preset["shard"], progress=False)
        seconds = time.perf_counter() - start
        assert stored.complete and len(stored) == n
        model.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"what": what, "prompts": n, "seconds": seconds, "rate": n / seconds, "peak_rss_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/nnterp-streaming"))
    parser.add_argument("--models", type=Path, default=Path(os.environ.get("NNTERP_BENCH_MODELS", "/tmp/nnterp-bench")))
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer folder of a built model (default: the bundled model's)")
    parser.add_argument("--prompts", type=int, default=None, help="N (default: the preset's)")
    parser.add_argument("--only", default=None,
                        help="comma-separated measurements to take (vanilla, stream-tenth, stream; default: all), "
                             "for a machine whose calls are shorter than the whole run")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    preset = PRESETS[args.preset]
    path = _model_path(preset, args.models, args.tokenizer)
    if args.child:
        row = child(args.child, preset, args.n, path, args.scratch / args.child)
        print("RESULT " + json.dumps(row), flush=True)
        return
    n = args.prompts or preset["prompts"]
    rows = []
    only = set(args.only.split(",")) if args.only else None
    for what, count in (("vanilla", min(n, preset["vanilla"])), ("stream-tenth", n // 10), ("stream", n)):
        if only is not None and what not in only:
            continue
        command = [sys.executable, "-m", "benchmarks.streaming", "--preset", args.preset, "--child", what,
                   "--n", str(count), "--scratch", str(args.scratch), "--models", str(args.models)]
        if args.tokenizer is not None:
            command += ["--tokenizer", str(args.tokenizer)]
        done = subprocess.run(command, capture_output=True, text=True)
        found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        row = json.loads(found[-1][len("RESULT "):]) if found else {"what": what, "error": done.stderr[-2000:]}
        rows.append(row)
        print(f"[streaming] {row}", flush=True)
    by = {row["what"]: row for row in rows if "rate" in row}
    summary = {}
    if "stream" in by and "vanilla" in by:
        summary["rate: streamed / vanilla vLLM (target >= 0.8)"] = by["stream"]["rate"] / by["vanilla"]["rate"]
    if "stream" in by and "stream-tenth" in by:
        summary["peak RSS: N / N/10 (target <= 1.2)"] = by["stream"]["peak_rss_gib"] / by["stream-tenth"]["peak_rss_gib"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"streaming-{args.preset}{'-' + args.only.replace(',', '-') if args.only else ''}.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    for name, value in summary.items():
        print(f"{name}: {value:.3f}")


if __name__ == "__main__":
    main()
