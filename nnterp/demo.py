"""The demo behind ``python -m nnterp demo``: a lens + steer graph on the bundled model.

For one prompt it runs two DSL graphs on each chosen backend: the logit lens alone
(what the residual stream after each layer would predict, through the final norm and
the unembedding) with the greedy continuation, and the same lens followed by a steer
that pushes layer 25 towards " London" at every generated token. On SmolLM2 and "The
capital of France is", " Paris" emerges in the upper layers and is the final layer's
top token; the steered run continues with " London" instead, and the lens shows the
steer acting only from layer 25 on. With both backends, the tables sit side by side.
"""

from __future__ import annotations

import sys
from typing import TextIO

import torch

__all__ = ["run_demo", "demo_graphs"]

STEER_LAYER = 25
STEER_SCALE = 80.0
STEER_TOKEN = " London"


def demo_graphs(tokenizer):
    """The clean and steered graphs: the lens, and the lens followed by a steer along the
    unembedding direction of " London" (normalised) at every position and step."""
    from nnterp.dsl import Lens, Steer

    token = tokenizer(STEER_TOKEN, add_special_tokens=False)["input_ids"][0]
    direction = _unembedding_row(token)
    lens = Lens(layers=all, top_k=1)
    return lens, lens >> Steer(STEER_LAYER, direction / direction.norm(), scale=STEER_SCALE)


def _unembedding_row(token: int) -> torch.Tensor:
    # SmolLM2 ties its unembedding to the token embedding; read it from the HF
    # checkpoint so both backends steer with the same vector
    from safetensors import safe_open

    from nnterp.bundled import bundled_model_path

    with safe_open(str(bundled_model_path() / "model.safetensors"), "pt") as weights:
        return weights.get_slice("model.embed_tokens.weight")[token].clone().float()


def _cell(tokenizer, probs: torch.Tensor, ids: torch.Tensor) -> str:
    token = repr(tokenizer.decode(ids))[:13]
    return f"{token:<14}{probs.item():>5.0%}"


def run_demo(backends: tuple[str, ...] = ("hf", "vllm"), prompt: str = "The capital of France is",
             max_tokens: int = 10, out: TextIO | None = None) -> dict:
    """Run the demo on each backend, print the tables to ``out``, return the results."""
    from nnterp import StandardizedTransformer
    from nnterp.dsl import Sampling, run

    out = out or sys.stdout
    sampling = Sampling(max_tokens=max_tokens)
    results = {}
    tokenizer = None
    for backend in backends:
        # said before the wait: a vLLM engine takes 15 s to start on a CPU, minutes on a
        # fresh GPU host (kernels are compiled on first use)
        wait = "starting a vLLM engine (15 s on a CPU; minutes on a fresh GPU host)" if backend == "vllm" \
            else "loading it with transformers"
        print(f"[{backend}] SmolLM2-135M-Instruct: {wait} ...", file=out, flush=True)
        # the same dtype on both backends, so their tables agree to float32 rounding
        with StandardizedTransformer("bundled", backend=backend, dtype="float32") as model:
            print(f"[{backend}] running the lens and the steered generation", file=out, flush=True)
            tokenizer = model.tokenizer
            lens, steered_graph = demo_graphs(tokenizer)
            results[backend] = (run(lens, model, prompt, sampling=sampling),
                                run(steered_graph, model, prompt, sampling=sampling))
            num_layers = model.num_layers
    print(f"nnterp demo: SmolLM2-135M-Instruct, prompt {prompt!r}", file=out)
    print(f"graphs: Lens(layers=all, top_k=1)   and   Lens(layers=all, top_k=1) >> "
          f"Steer({STEER_LAYER}, <{STEER_TOKEN!r} direction>, scale={STEER_SCALE:g})\n", file=out)
    print("logit lens at the last position: top token and its probability after each layer", file=out)
    header = f"{'layer':>5}"
    for backend in results:
        header += f"  {backend + ' lens':<19}  {backend + ' lens >> steer':<19}"
    print(header, file=out)
    print("-" * len(header), file=out)
    for layer in range(num_layers):
        line = f"{layer:>5}"
        for clean, steered in results.values():
            for result in (clean, steered):
                probs, ids = result["lens"]
                line += f"  {_cell(tokenizer, probs[0, layer, 0], ids[0, layer, 0]):<19}"
        print(line, file=out)
    print(file=out)
    for backend, (clean, steered) in results.items():
        print(f"{backend:>5} greedy:  {prompt!r} + {clean.texts[0]!r}", file=out)
        print(f"{backend:>5} steered: {prompt!r} + {steered.texts[0]!r}", file=out)
    return results
