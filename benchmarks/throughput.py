"""Throughput of nnterp against its anchors: every workload on every system, in one process.

Workloads (sizes per preset; the GPU presets use the sizes of issue 13, so that each
timed run lasts seconds):

* ``steer``: greedy generation with a vector added to a middle layer's output at every
  position and every step (GPU: 256 prompts of 32 tokens, 128 new tokens each);
* ``steer-all``: the same with the vector added to every layer (DSL systems);
* ``lens``: the logit lens over all layers at the last position, top-5 (GPU: 4,096 prompts);
* ``collect``: the last-token residual stream of every layer (GPU: 8,192 prompts).
* ``sweep``: 240 steering graphs (30 layer slots x 8 scales) on every prompt, as one
  batched call (``run([g1, ..., g240], ...)``; DSL systems on vLLM), against
  ``sweep-one``: one graph over the same number of requests (the target: 0.9x), and
  ``sweep-calls``: the 240 graphs as separate calls (a share of them).

Systems:

* ``vllm-graphs`` (GPU), ``vllm-eager`` (CPU): vanilla vLLM at its best, no
  intervention (the ceiling): token ids in (``TokensPrompt``), ``detokenize=False``; for
  lens and collect, one generated token per prompt. Every ratio uses this form;
* ``vllm-graphs-text``, ``vllm-eager-text``: the same engine given text, as a casual user
  calls it (vLLM tokenizes and detokenizes each request): a labelled second column only;
* ``hf``: vanilla transformers, no intervention, on a pre-tokenized batch: ``generate``
  for steer, one batched forward pass for lens and collect;
* ``dsl-vllm-graphs`` (GPU): ``nnterp.dsl.run`` on a compiled engine replaying CUDA
  graphs (``cuda_graphs=True``), with the batch-wide executor's hooks compiled in;
* ``dsl-vllm``: the same on an eager engine; ``dsl-vllm-nnsight``: the eager engine
  with the old executor (``dsl_executor="nnsight"``: one intervention per request);
* ``dsl-hf``: ``run`` on the HF backend;
* ``nnsight-vllm`` (and ``nnsight-hf`` when named in ``--systems``): the same work written
  by hand against nnsight;
* ``...-tp2``: steer at tensor parallel 2 (``--tp2``, needs two GPUs), with NVLink
  multicast kept off for vanilla and nnterp alike (`nvlink_multicast=False`).

The slow systems (nnsight's per-request interventions on vLLM) run a share of each
workload (`SLOW_SHARE`); rates are per token or prompt. HF runs every workload whole:
a lens or collect there is one padded forward pass, and at an eighth of the prompts
(0.1-0.4 s on an H200) a ratio would mostly measure the per-run cost. Every system is timed after a warm-up on
the same prompts, ``--repeats`` times (median, default 3). Generated tokens are compared
between systems that do the same work. Results go to ``OUT/throughput-<preset>.json``
and ``.md``. Models are built on the machine: random-weight Llama configurations
(``1b``, ``8b``), saved once under ``--models``; the ``cpu`` preset uses the bundled
SmolLM2.

Run: ``python -m benchmarks.throughput --preset 1b --out results`` on a GPU host;
``make bench`` runs ``--preset cpu``, a few minutes on two cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

#: random-weight Llama shapes; vocabulary and tokenizer are the bundled SmolLM2's
LLAMA_SHAPES = {
    # TinyLlama-1.1B's shape
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),
    # Llama-3-8B's shape: 16 GB of bfloat16 weights, comfortable on one 80 GB H100
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8),
}

#: Workload sizes: steer (prompts, prompt tokens, new tokens), lens and collect (prompts,
#: prompt tokens). The GPU sizes make every timed run last seconds (issue 13).
PRESETS = {
    "1b": dict(model="1b", dtype="bfloat16", steer=(256, 32, 128), lens=(4096, 32), collect=(8192, 32),
               sweep=(30, 8, 256, 32, 16)),
    "8b": dict(model="8b", dtype="bfloat16", steer=(256, 32, 128), lens=(4096, 32), collect=(8192, 32),
               sweep=(30, 8, 64, 32, 16)),
    "cpu": dict(model="bundled", dtype="float32", steer=(4, 16, 8), lens=(8, 16), collect=(16, 16),
                sweep=(3, 8, 2, 16, 4)),
}
#: The sweep (issue 21): layer slots x scales steering graphs, each its own plan, on
#: (prompts, prompt tokens, new tokens). Slot ``i`` steers layer ``i % layers`` with a
#: vector of its own, so that every graph differs even where slots outnumber layers.
#: The share of each workload the slow systems (nnsight per-request interventions) run:
#: their rate is per prompt or token, so a smaller run measures it in less device time.
SLOW_SHARE = {"1b": 0.125, "8b": 0.125, "cpu": 1.0}


TOP_K = 5


# -- models and prompts -----------------------------------------------------------------

def build_model(shape: str, folder: Path, tokenizer: Path) -> Path:
    """Save a random-weight Llama of ``shape`` (bfloat16) with ``tokenizer``, once."""
    import transformers

    if (folder / "config.json").exists():
        return folder
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer)
    config = transformers.LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
                                      **LLAMA_SHAPES[shape])
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial, max_shard_size="4GB")
    tok.save_pretrained(partial)
    partial.rename(folder)
    del model
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return folder


def make_prompts(tokenizer: Any, n: int, length: int, seed: int) -> list[str]:
    """``n`` prompts of exactly ``length`` tokens, of random whole words."""
    rng = random.Random(seed)
    words = [w for w in (tokenizer.decode([i]) for i in range(min(len(tokenizer), 20000)))
             if len(w) > 3 and w[0] == " " and w[1:].isalpha() and w[1:].islower()]
    prompts = []
    while len(prompts) < n:
        text = "".join(rng.choice(words) for _ in range(length))
        if len(tokenizer(text)["input_ids"]) == length:
            prompts.append(text)
    return prompts


# -- hand-written nnsight ---------------------------------------------------------------

def hand_vllm_steer(nn: Any, prompts: list[str], layer: int, vector: torch.Tensor, n_tokens: int) -> list:
    with nn.trace(temperature=0.0, max_tokens=n_tokens) as tracer:
        for prompt in prompts:
            with tracer.invoke(prompt):
                delta = None
                for step in tracer.iter[:n_tokens]:
                    out = nn.model.layers[layer].output
                    hidden = out[0] if isinstance(out, tuple) else out
                    if delta is None:
                        delta = vector.to(hidden.device, hidden.dtype)
                    hidden += delta  # hidden + residual is the stream: adding to hidden steers it
    return [list(o.outputs[0].token_ids) for o in nn.last_outputs]


def hand_vllm_lens(nn: Any, prompts: list[str], layers: int) -> dict:
    import nnsight

    with nn.trace(temperature=0.0, max_tokens=1) as tracer:
        store = nnsight.save({})
        for row, prompt in enumerate(prompts):
            with tracer.invoke(prompt):
                for i in range(layers):
                    out = nn.model.layers[i].output
                    last = out[0][-1:] + out[1][-1:]
                    logits = torch.nn.functional.linear(nn.model.norm(last), nn.lm_head.weight)
                    top = logits.float().softmax(-1).topk(TOP_K, dim=-1)
                    store[(row, i)] = (top.values.clone(), top.indices.clone())
    return store


def hand_vllm_collect(nn: Any, prompts: list[str], layers: int) -> dict:
    import nnsight

    with nn.trace(temperature=0.0, max_tokens=1) as tracer:
        store = nnsight.save({})
        for row, prompt in enumerate(prompts):
            with tracer.invoke(prompt):
                for i in range(layers):
                    out = nn.model.layers[i].output
                    store[(row, i)] = out[0][-1] + out[1][-1]  # a new tensor: safe to keep
    return store


def hand_hf_steer(nn: Any, prompts: list[str], layer: int, vector: torch.Tensor, n_tokens: int) -> list:
    with torch.no_grad(), nn.generate(prompts, max_new_tokens=n_tokens, do_sample=False,
                                      pad_token_id=nn.tokenizer.pad_token_id) as tracer:
        delta = None
        for step in tracer.iter[:n_tokens]:
            out = nn.model.layers[layer].output
            hidden = out[0] if isinstance(out, tuple) else out
            if delta is None:
                delta = vector.to(hidden.device, hidden.dtype)
            hidden += delta
        ids = tracer.result.save()
    return ids[:, -n_tokens:].tolist()


def hand_hf_lens(nn: Any, prompts: list[str], layers: int) -> list:
    results = []
    with torch.no_grad(), nn.trace(prompts):
        for i in range(layers):
            out = nn.model.layers[i].output
            last = (out[0] if isinstance(out, tuple) else out)[:, -1]
            top = nn.lm_head(nn.model.norm(last)).float().softmax(-1).topk(TOP_K, dim=-1)
            results.append((top.values.save(), top.indices.save()))
    return results


def hand_hf_collect(nn: Any, prompts: list[str], layers: int) -> list:
    results = []
    with torch.no_grad(), nn.trace(prompts):
        for i in range(layers):
            out = nn.model.layers[i].output
            results.append((out[0] if isinstance(out, tuple) else out)[:, -1].save())
    return results


# -- nnterp DSL -------------------------------------------------------------------------

def dsl_steer(model: Any, prompts: list[str], layer: int | list[int], vector: torch.Tensor, n_tokens: int) -> list:
    from nnterp.dsl import Graph, Sampling, Steer, run

    layers = [layer] if isinstance(layer, int) else layer
    return run(Graph([Steer(i, vector) for i in layers]), model, prompts, sampling=Sampling(max_tokens=n_tokens)).tokens


def dsl_lens(model: Any, prompts: list[str], layers: int) -> Any:
    from nnterp.dsl import Lens, run

    return run(Lens(top_k=TOP_K), model, prompts)["lens"]


def dsl_collect(model: Any, prompts: list[str], layers: int) -> Any:
    from nnterp.dsl import Graph, Read, run

    return run(Graph([Read(f"layers[{i}].output") for i in range(layers)]), model, prompts)


def sweep_graphs(slots: int, scales: int, layers: int, hidden: int) -> list:
    from nnterp.dsl import Steer

    generator = torch.Generator().manual_seed(5)
    vectors = [4.0 * torch.randn(hidden, generator=generator) / hidden ** 0.5 for _ in range(slots)]
    return [Steer(slot % layers, vectors[slot], scale=0.25 * (k + 1)) for slot in range(slots) for k in range(scales)]


def dsl_sweep(model: Any, graphs: list, prompts: list[str], n_tokens: int) -> list:
    from nnterp.dsl import Sampling, run

    results = run(graphs, model, prompts, sampling=Sampling(max_tokens=n_tokens))
    return [row for result in results for row in result.tokens]


def dsl_sweep_calls(model: Any, graphs: list, prompts: list[str], n_tokens: int) -> list:
    from nnterp.dsl import Sampling, run

    return [row for graph in graphs for row in run(graph, model, prompts, sampling=Sampling(max_tokens=n_tokens)).tokens]


# -- vanilla ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PromptSet:
    """One workload's prompts, in every form a system may take, built before any timing.

    An expert gives each reference system its best input: vLLM token ids
    (``TokensPrompt``, with ``detokenize=False``), HF a pre-tokenized batch. nnterp's
    ``run`` takes text and tokenizes inside the timed call, as its users do. Every
    prompt has the same length, so the HF batch needs no padding.
    """

    texts: list[str]
    #: vLLM's token-id prompts (``vllm.inputs.TokensPrompt`` is this dict)
    tokens_prompts: list[dict]
    #: the HF batch, ``[prompts, tokens]``
    input_ids: torch.Tensor

    @classmethod
    def of(cls, tokenizer: Any, texts: list[str]) -> "PromptSet":
        ids = tokenizer(texts)["input_ids"]
        return cls(texts, [{"prompt_token_ids": i} for i in ids], torch.tensor(ids, dtype=torch.long))

    def on(self, device: Any) -> "PromptSet":
        """The same prompts with the HF batch already on ``device``."""
        return dataclasses.replace(self, input_ids=self.input_ids.to(device))

    def __getitem__(self, part: slice) -> "PromptSet":
        return PromptSet(self.texts[part], self.tokens_prompts[part], self.input_ids[part])

    def __len__(self) -> int:
        return len(self.texts)


def vllm_generate(llm: Any, prompts: PromptSet, n_tokens: int) -> list:
    """Vanilla vLLM at its best: token ids in, no detokenizer, and one ``SamplingParams``
    marked ``skip_clone`` for every request. Unmarked, vLLM deep-copies it for each request
    (1.4 s of an 8,192-prompt collect at 8B on an H200, profiled); one built per request
    is validated per request (0.6 s of a 4,096-prompt lens at 1.1B). Every request has the
    same settings, so sharing one is safe."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=n_tokens, detokenize=False, skip_clone=True)
    outputs = llm.generate(prompts.tokens_prompts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def vllm_generate_text(llm: Any, prompts: PromptSet, n_tokens: int) -> list:
    """Vanilla vLLM as a casual user calls it: text in, vLLM tokenizes and detokenizes each
    request (the ``-text`` column; never a ratio's reference)."""
    from vllm import SamplingParams

    outputs = llm.generate(prompts.texts, SamplingParams(temperature=0.0, max_tokens=n_tokens), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def hf_generate(hf: Any, prompts: PromptSet, n_tokens: int, pad_token_id: int) -> list:
    """Vanilla transformers ``generate`` on the pre-tokenized batch."""
    ids = prompts.input_ids
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens,
                          do_sample=False, pad_token_id=pad_token_id)
    return out[:, ids.shape[1]:].tolist()


def hf_forward(hf: Any, prompts: PromptSet) -> Any:
    """One forward pass of vanilla transformers over the pre-tokenized batch."""
    ids = prompts.input_ids
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].float().cpu()


# -- harness ----------------------------------------------------------------------------

def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _first_line(error: Exception) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _profile_text(profiler: Any) -> str:
    import io
    import pstats

    text = io.StringIO()
    for order in ("tottime", "cumulative"):
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(45)
    return text.getvalue()


def _start_engine_profile(worker: Any) -> None:
    """Run in each engine worker (``collective_rpc``; needs VLLM_ALLOW_INSECURE_SERIALIZATION)."""
    import cProfile

    worker.bench_profiler = cProfile.Profile()
    worker.bench_profiler.enable()


def _stop_engine_profile(worker: Any, stem: str) -> None:
    worker.bench_profiler.disable()
    Path(f"{stem}-{os.getpid()}.txt").write_text(_profile_text(worker.bench_profiler))


class Bench:
    """Times each (workload, system), keeps tokens for cross-checks, writes as it goes."""

    def __init__(self, preset: str, out: Path, repeats: int, meta: dict, profile: bool = False,
                 workloads: set[str] | None = None) -> None:
        self.preset, self.out, self.repeats, self.meta = preset, out, repeats, meta
        #: the workloads timed (None: all); the others are skipped, warm-up included
        self.workloads = workloads
        #: after the timed runs, run once more under cProfile and write the profile
        self.profile = profile
        self.rows: list[dict] = []
        self.tokens: dict[tuple[str, str], list] = {}

    def time(self, workload: str, system: str, fn: Callable[[], Any], warmup: Callable[[], Any],
             units: Callable[[Any], int], unit: str, engine: Any = None) -> None:
        """Time ``fn`` (median of ``repeats``) after one call of ``warmup``, a smaller run of
        the same kind that brings every lazy path up (kernels, caches, allocator)."""
        if self.workloads is not None and workload not in self.workloads:
            return
        row = {"workload": workload, "system": system, "unit": unit}
        try:
            warmup()
            _sync()
            seconds = []
            for _ in range(self.repeats):
                start = time.perf_counter()
                result = fn()
                _sync()
                seconds.append(time.perf_counter() - start)
            median = statistics.median(seconds)
            count = units(result)
            row.update(seconds=median, all_seconds=seconds, count=count, rate=count / median)
            if workload.startswith("steer"):
                self.tokens[(workload, system)] = result
            if self.profile:
                self._profile(workload, system, fn, engine)
        except Exception as error:  # a failing system is reported, and the others still run
            row.update(error=_first_line(error))
            traceback.print_exc()
        self._record(row)

    def _profile(self, workload: str, system: str, fn: Callable[[], Any], engine: Any = None) -> None:
        """One more run (not timed) under cProfile, written as text: this process's
        profile, and with ``engine`` (a ``vllm.LLM``) the engine's, taken in each worker
        (with one GPU, the engine core process: scheduler, runner and nnterp's hooks)."""
        import cProfile

        name = f"profile-{self.preset}-{system}-{workload}"
        self.out.mkdir(parents=True, exist_ok=True)
        if engine is not None:
            engine.collective_rpc(_start_engine_profile)
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        fn()
        _sync()
        profiler.disable()
        seconds = time.perf_counter() - start
        if engine is not None:
            engine.collective_rpc(_stop_engine_profile, args=(str(self.out / f"{name}-engine"),))
        (self.out / f"{name}.txt").write_text(f"{system} {workload}: {seconds:.3f} s under the profiler\n"
                                             + _profile_text(profiler))

    def failed(self, workload: str, system: str, error: Exception) -> None:
        """Record a system whose engine did not start."""
        traceback.print_exc()
        self._record({"workload": workload, "system": system, "error": f"engine: {_first_line(error)}"})

    def _record(self, row: dict) -> None:
        # written at once: a run cut off by a time limit keeps every row it reached
        self.rows.append(row)
        shown = (f"{row['rate']:.1f} {row['unit']}/s ({row['seconds']:.2f} s)" if "rate" in row
                 else row["error"])
        print(f"[bench] {row['workload']:<8} {row['system']:<22} {shown}", flush=True)
        self.write()

    def rate(self, workload: str, system: str) -> float | None:
        for row in self.rows:
            if row["workload"] == workload and row["system"] == system and "rate" in row:
                return row["rate"]
        return None

    def has_failed(self, workload: str, system: str) -> bool:
        return any(row["workload"] == workload and row["system"] == system and "error" in row
                   for row in self.rows)

    def ratios(self) -> list[dict]:
        """The targets (issue 20), as measured in this run. Every vanilla vLLM reference is
        the token-id form; where the text form also ran, its ratio is given beside, for
        comparison with figures published before issue 20, never as the target."""
        found = []

        def ratio(name: str, num: tuple[str, str], den: tuple[str, str], target: float | None) -> None:
            a, b = self.rate(*num), self.rate(*den)
            if a is None and b is None:
                return
            value = a / b if a and b else None
            text = self.rate(den[0], f"{den[1]}-text")
            found.append({"ratio": name, "numerator": "/".join(num), "denominator": "/".join(den),
                          "value": value, "target": target,
                          "met": value is not None and (target is None or value >= target),
                          "failed": self.has_failed(*num) or self.has_failed(*den),
                          "value_vs_text": a / text if a and text else None})

        ratio("steer, one layer: DSL / vanilla vLLM (graphs)", ("steer", "dsl-vllm-graphs"), ("steer", "vllm-graphs"), 0.97)
        ratio("steer, every layer: DSL / vanilla vLLM (graphs)", ("steer-all", "dsl-vllm-graphs"),
              ("steer", "vllm-graphs"), 0.90)
        for workload in ("lens", "collect"):
            ratio(f"{workload}: DSL / vanilla vLLM (graphs)", (workload, "dsl-vllm-graphs"), (workload, "vllm-graphs"), 0.92)
            ratio(f"{workload}: DSL-vLLM / vanilla HF", (workload, "dsl-vllm-graphs"), (workload, "hf"), 1.0)
            ratio(f"{workload}: DSL-HF / vanilla HF", (workload, "dsl-hf"), (workload, "hf"), 0.80)
        ratio("steer, TP=2: DSL / vanilla vLLM (graphs)", ("steer", "dsl-vllm-graphs-tp2"), ("steer", "vllm-graphs-tp2"), 0.85)
        # the CPU preset's eager engines: no target, the ratios are what `make bench` shows
        ratio("steer, one layer: DSL / vanilla vLLM (eager)", ("steer", "dsl-vllm"), ("steer", "vllm-eager"), None)
        ratio("steer, every layer: DSL / vanilla vLLM (eager)", ("steer-all", "dsl-vllm"), ("steer", "vllm-eager"), None)
        for workload in ("lens", "collect"):
            ratio(f"{workload}: DSL / vanilla vLLM (eager)", (workload, "dsl-vllm"), (workload, "vllm-eager"), None)
        ratio("sweep of graphs, one call / one graph, same requests (graphs)", ("sweep", "dsl-vllm-graphs"),
              ("sweep-one", "dsl-vllm-graphs"), 0.90)
        ratio("sweep of graphs, one call / one graph, same requests (eager)", ("sweep", "dsl-vllm"),
              ("sweep-one", "dsl-vllm"), None)
        ratio("sweep of graphs, one call / separate calls (eager)", ("sweep", "dsl-vllm"),
              ("sweep-calls", "dsl-vllm"), None)
        ratio("sweep of graphs, one call / separate calls (graphs)", ("sweep", "dsl-vllm-graphs"),
              ("sweep-calls", "dsl-vllm-graphs"), None)
        for workload in ("steer", "lens", "collect"):
            ratio(f"{workload}: batched / nnsight executor (eager engine)", (workload, "dsl-vllm"),
                  (workload, "dsl-vllm-nnsight"), 1.0)
        return found

    def agreement(self) -> list[dict]:
        pairs = [("dsl-hf", "nnsight-hf"), ("dsl-vllm", "nnsight-vllm"), ("dsl-vllm", "dsl-vllm-graphs"),
                 ("dsl-vllm", "dsl-vllm-nnsight"), ("vllm-eager", "vllm-graphs"), ("dsl-vllm-graphs", "dsl-hf"),
                 ("vllm-graphs", "vllm-graphs-text"), ("vllm-eager", "vllm-eager-text")]
        found = []
        for a, b in pairs:
            ta, tb = self.tokens.get(("steer", a)), self.tokens.get(("steer", b))
            if ta is not None and tb is not None:
                same = sum(x == y for x, y in zip(ta, tb))
                found.append({"pair": f"{a} vs {b}", "identical_generations": same, "of": min(len(ta), len(tb))})
        return found

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        document = {"meta": self.meta, "rows": self.rows, "ratios": self.ratios(), "agreement": self.agreement()}
        (self.out / f"throughput-{self.preset}.json").write_text(json.dumps(document, indent=1))
        (self.out / f"throughput-{self.preset}.md").write_text(render(document))


def render(document: dict) -> str:
    meta = document["meta"]
    lines = [f"### {meta['preset']}: {meta['model']}", "",
             f"{meta['device']}; {meta['date']}; commit {meta['commit']}; torch {meta['torch']}, "
             f"vLLM {meta['vllm']}, nnsight {meta['nnsight']}, transformers {meta['transformers']}; "
             f"{meta['dtype']}; median of {meta['repeats']} after a warm-up.", "",
             "| workload | system | rate | seconds |", "| --- | --- | --- | --- |"]
    for row in document["rows"]:
        if "rate" in row:
            lines.append(f"| {row['workload']} | {row['system']} | {row['rate']:,.1f} {row['unit']}/s | "
                         f"{row['seconds']:.2f} |")
        else:
            lines.append(f"| {row['workload']} | {row['system']} | failed: {row['error']} | |")
    lines += ["", "| ratio (vanilla vLLM given token ids) | value | target | met | against vanilla given text |",
              "| --- | --- | --- | --- | --- |"]
    for r in document["ratios"]:
        value = f"{r['value']:.3f}" if r["value"] is not None else "n/a"
        met = ("yes" if r["met"] else "no") if r["value"] is not None else \
            "failed" if r.get("failed") else "not run"
        target = f">= {r['target']}" if r["target"] is not None else "none"
        if r["target"] is None and r["value"] is not None:
            met = ""
        text = f"{r['value_vs_text']:.3f}" if r.get("value_vs_text") is not None else ""
        lines.append(f"| {r['ratio']} | {value} | {target} | {met} | {text} |")
    if document["agreement"]:
        lines += ["", "| steer generations compared | identical |", "| --- | --- |"]
        for a in document["agreement"]:
            lines.append(f"| {a['pair']} | {a['identical_generations']} / {a['of']} |")
    return "\n".join(lines) + "\n"


def merged(paths: list[Path]) -> dict:
    """One document from several runs' JSON files (rows in order; meta of the first)."""
    documents = [json.loads(path.read_text()) for path in paths]
    bench = Bench(documents[0]["meta"]["preset"], Path("."), documents[0]["meta"]["repeats"], documents[0]["meta"])
    for document in documents:
        bench.rows += document["rows"]
    return {"meta": bench.meta, "rows": bench.rows, "ratios": bench.ratios(), "agreement": []}


def render_merged(paths: list[Path]) -> str:
    """One table from several runs' JSON files (rows in order; meta of the first)."""
    return render(merged(paths))


def _meta(preset: str, model: str, dtype: str, repeats: int) -> dict:
    import nnsight
    import transformers

    try:
        import vllm

        vllm_version = vllm.__version__
    except Exception:
        vllm_version = "not installed"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'}, {len(os.sched_getaffinity(0))} cores)"
    commit = os.environ.get("NNTERP_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    check=True).stdout.strip()
        except Exception:
            commit = "unknown"
    return {"preset": preset, "model": model, "dtype": dtype, "repeats": repeats, "device": device,
            "gpus": torch.cuda.device_count(), "date": datetime.date.today().isoformat(), "commit": commit,
            "torch": torch.__version__, "vllm": vllm_version, "nnsight": nnsight.__version__,
            "transformers": transformers.__version__}


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _shutdown_llm(llm: Any) -> None:
    engine = getattr(llm, "llm_engine", None)
    client = getattr(engine, "engine_core", None)
    if client is not None:
        client.shutdown()


def _wait_for_gpu_memory(fraction: float = 0.8, timeout: float = 60.0) -> None:
    """Wait until a shut-down engine's process has given its GPU memory back."""
    if not torch.cuda.is_available():
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        free, total = torch.cuda.mem_get_info(0)
        if free >= fraction * total:
            return
        time.sleep(1)


def tensor_parallel(bench: Bench, path: Path, engine: dict, sizes: dict, prompts: PromptSet, layer: int,
                    vector: torch.Tensor, n_tokens: int, generated: Callable) -> None:
    """Steering at tensor parallel 2: the DSL on a compiled engine, then vanilla vLLM, both
    kept off NVLink multicast, which the GPU hosts must never use: the DSL's engine with
    ``nvlink_multicast=False``, vanilla vLLM with the same settings
    (`nnterp.backends.vllm_settings.without_multicast`)."""
    from vllm import LLM

    from nnterp import StandardizedTransformer
    from nnterp.backends.vllm_settings import without_multicast

    few = prompts[:8]
    try:
        model = StandardizedTransformer(path, backend="vllm", cuda_graphs=True, tensor_parallel_size=2,
                                        nvlink_multicast=False, **engine, **sizes)
        bench.time("steer", "dsl-vllm-graphs-tp2", lambda: dsl_steer(model, prompts.texts, layer, vector, n_tokens),
                   lambda: dsl_steer(model, few.texts, layer, vector, 8), generated, "tok")
        model.close()
        del model
    except Exception as error:
        bench.failed("steer", "dsl-vllm-graphs-tp2", error)
    _free()
    _wait_for_gpu_memory()
    try:
        vanilla, environment = without_multicast({**engine, **sizes})
        os.environ.update(environment)  # read by vanilla's engine processes, which inherit them
        os.environ.pop("VLLM_USE_BREAKABLE_CUDAGRAPH", None)  # set by a tapped nnsight engine
        llm = LLM(str(path), tensor_parallel_size=2, enable_prefix_caching=False, **vanilla)
        bench.time("steer", "vllm-graphs-tp2", lambda: vllm_generate(llm, prompts, n_tokens),
                   lambda: vllm_generate(llm, few, 8), generated, "tok")
        _shutdown_llm(llm)
        del llm
    except Exception as error:
        bench.failed("steer", "vllm-graphs-tp2", error)
    _free()


def isolated(args: argparse.Namespace) -> None:
    """Each system of ``--systems`` in a process of its own, one after the other, and one
    table of them all. In one process, a system that runs after another engine has come
    and gone runs slower: on an H200 (1.1B, 2026-12-04) the DSL steered at 26,962 tok/s
    after vanilla vLLM's engine had run in the process, and at 36,845 in a process of its
    own, whichever process state the first engine leaves behind."""
    import sys

    if args.systems == "all":
        raise SystemExit("--isolate needs --systems: the systems to run, each in its own process")
    passed = [a for a in sys.argv[1:] if a != "--isolate"]
    paths = []
    for system in args.systems.split(","):
        tag = f"{args.tag}-{system}"
        command = [sys.executable, "-m", "benchmarks.throughput", *passed, "--systems", system, f"--tag={tag}"]
        subprocess.run(command, check=False)
        path = args.out / f"throughput-{args.preset}{tag}.json"
        if path.exists():
            paths.append(path)
    if not paths:
        raise SystemExit("no system wrote results")
    document = merged(paths)
    document["meta"]["isolated"] = True
    (args.out / f"throughput-{args.preset}{args.tag}.json").write_text(json.dumps(document, indent=1))
    table = render(document)
    (args.out / f"throughput-{args.preset}{args.tag}.md").write_text(table)
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--models", type=Path, default=Path(os.environ.get("NNTERP_BENCH_MODELS", "/tmp/nnterp-bench")))
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (default: the bundled model's)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--systems", default="all", help="comma-separated systems to run (default: all)")
    parser.add_argument("--workloads", default="all",
                        help="comma-separated workloads to time (steer, steer-all, lens, collect, sweep, sweep-one, "
                             "sweep-calls; default: all)")
    parser.add_argument("--tp2", action="store_true", help="also run steer at tensor parallel 2")
    parser.add_argument("--gpu-memory", type=float, default=0.45, help="gpu_memory_utilization per engine")
    parser.add_argument("--tag", default="", help="suffix of the output files' names")
    parser.add_argument("--profile", action="store_true",
                        help="after each timed workload, profile one more run (cProfile) into OUT")
    parser.add_argument("--render", nargs="+", type=Path, default=None, metavar="JSON",
                        help="print one table (and its ratios) from the rows of earlier runs' JSON files")
    parser.add_argument("--isolate", action="store_true",
                        help="run each system of --systems in a process of its own, then merge the tables")
    args = parser.parse_args()
    if args.render:
        print(render_merged(args.render))
        return
    if args.isolate:
        isolated(args)
        return
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    if args.profile:  # the engine profiles are started by sending functions to the workers
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"

    import nnterp
    from nnterp import StandardizedTransformer

    preset = PRESETS[args.preset]
    gpu = torch.cuda.is_available()
    repeats = args.repeats or 3
    if preset["model"] == "bundled":
        path = nnterp.bundled_model_path()
    else:
        tokenizer_dir = args.tokenizer or nnterp.bundled_model_path()
        start = time.perf_counter()
        path = build_model(preset["model"], args.models / f"llama-{preset['model']}", tokenizer_dir)
        print(f"[bench] model at {path} ({time.perf_counter() - start:.0f} s)", flush=True)
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = transformers.AutoConfig.from_pretrained(path)
    layers, hidden = config.num_hidden_layers, config.hidden_size
    n_steer, steer_len, n_tokens = preset["steer"]
    steer_prompts = PromptSet.of(tokenizer, make_prompts(tokenizer, n_steer, steer_len, seed=1))
    lens_prompts = PromptSet.of(tokenizer, make_prompts(tokenizer, preset["lens"][0], preset["lens"][1], seed=2))
    collect_prompts = PromptSet.of(tokenizer, make_prompts(tokenizer, *preset["collect"], seed=3))
    vector = 4.0 * torch.randn(hidden, generator=torch.Generator().manual_seed(0)) / hidden ** 0.5
    mid = layers // 2
    dtype = preset["dtype"]
    meta = _meta(args.preset, f"{preset['model']} Llama ({layers} layers, hidden {hidden}, vocab {config.vocab_size})"
                 if preset["model"] != "bundled" else "bundled SmolLM2-135M-Instruct", dtype, repeats)
    meta["workloads"] = {"steer": f"{n_steer} prompts x {steer_len} tokens, {n_tokens} new tokens, greedy, "
                                  f"vector added to layer {mid} at every position and step",
                         "lens": f"{len(lens_prompts)} prompts x {preset['lens'][1]} tokens, all {layers} layers, "
                                 f"last position, top-{TOP_K}",
                         "collect": f"{len(collect_prompts)} prompts x {preset['collect'][1]} tokens, last-token "
                                    f"residual stream of all {layers} layers"}
    bench = Bench(args.preset + args.tag, args.out, repeats, meta, profile=args.profile,
                  workloads=None if args.workloads == "all" else set(args.workloads.split(",")))
    wanted = None if args.systems == "all" else set(args.systems.split(","))

    def want(system: str) -> bool:
        return wanted is None or system in wanted

    generated = lambda tokens: sum(len(t) for t in tokens)  # noqa: E731
    engine = dict(dtype=dtype)
    if gpu:
        engine.update(gpu_memory_utilization=args.gpu_memory, max_model_len=512)

    def workloads(system: str, steer: Callable, lens: Callable, collect: Callable, share: float = 1.0,
                  steer_all: Callable | None = None, engine: Any = None, device: Any = None) -> None:
        """Time one system on the workloads; ``steer(prompts, n_tokens)``, ``lens(prompts)``,
        each given a `PromptSet` (``device``: where its HF batch is put, before timing);
        ``share`` of each workload's prompts (slow systems)."""
        few = 8

        def part(prompts: PromptSet) -> PromptSet:
            prompts = prompts if device is None else prompts.on(device)
            return prompts[: max(few, int(len(prompts) * share))]

        sp, lp, cp = part(steer_prompts), part(lens_prompts), part(collect_prompts)
        bench.time("steer", system, lambda: steer(sp, n_tokens), lambda: steer(sp[:few], min(8, n_tokens)),
                   generated, "tok", engine)
        if steer_all is not None:
            bench.time("steer-all", system, lambda: steer_all(sp, n_tokens),
                       lambda: steer_all(sp[:few], min(8, n_tokens)), generated, "tok", engine)
        bench.time("lens", system, lambda: lens(lp), lambda: lens(lp[:few]), lambda _: len(lp), "prompt", engine)
        bench.time("collect", system, lambda: collect(cp), lambda: collect(cp[:few]), lambda _: len(cp), "prompt",
                   engine)

    def hf_systems() -> None:
        """The DSL, hand-written nnsight and vanilla transformers, on one HF model."""
        if not any(want(s) for s in ("hf", "dsl-hf", "nnsight-hf")):
            return
        model = StandardizedTransformer(path, backend="hf", dtype=getattr(torch, dtype),
                                        device_map="cuda" if gpu else "cpu")
        hf, nn = model.nnsight_model._module, model.nnsight_model
        if want("dsl-hf"):
            workloads("dsl-hf", lambda p, n: dsl_steer(model, p.texts, mid, vector, n),
                      lambda p: dsl_lens(model, p.texts, layers), lambda p: dsl_collect(model, p.texts, layers))
        if wanted is not None and want("nnsight-hf"):
            workloads("nnsight-hf", lambda p, n: hand_hf_steer(nn, p.texts, mid, vector, n),
                      lambda p: hand_hf_lens(nn, p.texts, layers), lambda p: hand_hf_collect(nn, p.texts, layers))
        if want("hf"):
            pad = tokenizer.pad_token_id
            workloads("hf", lambda p, n: hf_generate(hf, p, n, pad), lambda p: hf_forward(hf, p),
                      lambda p: hf_forward(hf, p), device=hf.device)
        del model, hf, nn
        _free()

    def nnterp_vllm(system: str, graphs: bool, executor: str = "batched") -> None:
        """``nnterp.dsl.run`` on an nnterp vLLM engine (and, on the eager engine with the
        batched executor, the same work written by hand against nnsight)."""
        hand = "nnsight-vllm" if not graphs and executor == "batched" else None
        if not want(system) and not (hand and want(hand)):
            return
        start = time.perf_counter()
        try:
            model = StandardizedTransformer(path, backend="vllm", cuda_graphs=graphs, dsl_executor=executor,
                                            **engine, **graph_sizes(graphs))
        except Exception as error:
            bench.failed("all", system, error)
            return
        print(f"[bench] {system} engine up in {time.perf_counter() - start:.0f} s", flush=True)
        share = 1.0 if executor == "batched" else SLOW_SHARE[args.preset]
        every = list(range(layers))
        if want(system):
            workloads(system, lambda p, n: dsl_steer(model, p.texts, mid, vector, n),
                      lambda p: dsl_lens(model, p.texts, layers), lambda p: dsl_collect(model, p.texts, layers),
                      share, steer_all=lambda p, n: dsl_steer(model, p.texts, every, vector, n),
                      engine=model.nnsight_model.vllm_entrypoint)
        if want(system) and executor == "batched":
            sweep(system, model)
        if hand and want(hand):
            nn = model.nnsight_model
            workloads(hand, lambda p, n: hand_vllm_steer(nn, p.texts, mid, vector, n),
                      lambda p: hand_vllm_lens(nn, p.texts, layers), lambda p: hand_vllm_collect(nn, p.texts, layers),
                      SLOW_SHARE[args.preset])
            del nn
        model.close()
        del model
        _free()
        _wait_for_gpu_memory()

    slots, scales, n_sweep, sweep_len, sweep_tokens = preset["sweep"]
    swept = sweep_graphs(slots, scales, layers, hidden)
    sweep_prompts = make_prompts(tokenizer, n_sweep, sweep_len, seed=4)
    meta["workloads"]["sweep"] = (f"{len(swept)} steering graphs ({slots} layer slots x {scales} scales) on "
                                  f"{n_sweep} prompts x {sweep_len} tokens, {sweep_tokens} new tokens, greedy, "
                                  "one call; sweep-one: one graph on the same requests")

    def sweep(system: str, model: Any) -> None:
        """The sweep as one call, one graph over as many requests, and separate calls (a
        share: their rate is per token)."""
        few = swept[:scales]
        bench.time("sweep", system, lambda: dsl_sweep(model, swept, sweep_prompts, sweep_tokens),
                   lambda: dsl_sweep(model, few, sweep_prompts, 4), generated, "tok", model.nnsight_model.vllm_entrypoint)
        repeated = sweep_prompts * len(swept)
        bench.time("sweep-one", system, lambda: dsl_steer(model, repeated, mid, vector, sweep_tokens),
                   lambda: dsl_steer(model, sweep_prompts, mid, vector, 4), generated, "tok")
        share = swept[: max(scales, int(len(swept) * SLOW_SHARE[args.preset]))]
        bench.time("sweep-calls", system, lambda: dsl_sweep_calls(model, share, sweep_prompts, sweep_tokens),
                   lambda: dsl_sweep_calls(model, few, sweep_prompts, 4), generated, "tok")

    def vanilla_vllm(system: str, eager: bool) -> None:
        """vLLM with no intervention: the ceiling."""
        if not (want(system) or want(f"{system}-text")) or (not gpu and not eager):
            return
        os.environ.pop("VLLM_USE_BREAKABLE_CUDAGRAPH", None)  # set by a tapped nnsight engine
        from vllm import LLM

        kwargs = dict(engine, **graph_sizes(not eager))
        if not gpu:
            from nnterp.backends.vllm_cpu import cpu_engine_kwargs

            kwargs = cpu_engine_kwargs(**kwargs)
        kwargs.update(enforce_eager=eager, enable_prefix_caching=False)
        start = time.perf_counter()
        try:
            llm = LLM(str(path), **kwargs)
        except Exception as error:
            bench.failed("all", system, error)
            return
        print(f"[bench] {system} engine up in {time.perf_counter() - start:.0f} s", flush=True)
        if want(system):
            workloads(system, lambda p, n: vllm_generate(llm, p, n), lambda p: vllm_generate(llm, p, 1),
                      lambda p: vllm_generate(llm, p, 1), engine=llm)
        if want(f"{system}-text"):  # the casual form, a labelled second column
            workloads(f"{system}-text", lambda p, n: vllm_generate_text(llm, p, n),
                      lambda p: vllm_generate_text(llm, p, 1), lambda p: vllm_generate_text(llm, p, 1))
        _shutdown_llm(llm)
        del llm
        _free()
        _wait_for_gpu_memory()

    def graph_sizes(graphs: bool) -> dict:
        # Capture graphs only for the batch sizes a run can use (steering decodes 64
        # sequences at a time): the same graphs vLLM would replay, captured in seconds.
        if not (gpu and graphs):
            return {}
        return {"compilation_config": {"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64, 128, 256]}}

    # Most telling first: a run cut off by a time limit keeps what it measured.
    if gpu:
        vanilla_vllm("vllm-graphs", False)
        nnterp_vllm("dsl-vllm-graphs", True)
    nnterp_vllm("dsl-vllm", False)
    nnterp_vllm("dsl-vllm-nnsight", False, executor="nnsight")
    hf_systems()
    if not gpu:
        vanilla_vllm("vllm-eager", True)
    if args.tp2:
        tensor_parallel(bench, path, engine, graph_sizes(True), steer_prompts, mid, vector, n_tokens, generated)
    bench.write()
    print((args.out / f"throughput-{args.preset}{args.tag}.md").read_text())


if __name__ == "__main__":
    main()
