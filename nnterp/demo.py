"""The demo behind ``python -m nnterp demo``: the logit lens on the bundled model.

For one prompt it prints, for every layer, the token the residual stream at the last
position would predict if the model stopped there (final norm + unembedding), with its
probability, then the model's greedy continuation. On SmolLM2 and "The capital of
France is", " Paris" emerges in the upper layers and is the final layer's top token.
"""

from __future__ import annotations

from typing import TextIO

import torch

__all__ = ["run_demo", "format_lens_table"]


def format_lens_table(tokenizer, probs: torch.Tensor, top: int = 3) -> str:
    """A readable table from ``probs`` ``[n_layers, vocab]``: top tokens per layer."""
    values, ids = probs.topk(top, dim=-1)
    header = f"{'layer':>5}  " + "  ".join(f"{'top ' + str(k + 1):<22}" for k in range(top))
    lines = [header, "-" * len(header)]
    for layer in range(probs.shape[0]):
        cells = []
        for k in range(top):
            token = repr(tokenizer.decode(ids[layer, k]))
            cells.append(f"{token[:14]:<15}{values[layer, k].item():>6.1%} ")
        lines.append(f"{layer:>5}  " + "  ".join(cells))
    return "\n".join(lines)


def run_demo(backend: str = "hf", prompt: str = "The capital of France is", max_tokens: int = 10,
             out: TextIO | None = None) -> dict:
    """Run the demo and print it to ``out``; return the lens probabilities and text."""
    import sys

    from nnterp import StandardizedTransformer

    out = out or sys.stdout
    kwargs = {"dtype": "float32"} if backend == "vllm" else {"dtype": torch.float32}
    with StandardizedTransformer("bundled", backend=backend, **kwargs) as model:
        layers = []
        with torch.no_grad(), model.trace(prompt):
            for i in range(model.num_layers):
                layers.append(model.project_on_vocab(model.layers_output[i][..., -1, :]).save())
        probs = torch.softmax(torch.stack([l.reshape(-1) for l in layers]).float(), dim=-1)
        with torch.no_grad(), model.generate(prompt, max_tokens=max_tokens) as tracer:
            ids = tracer.result.save()
        continuation = model.tokenizer.decode(ids[0, -max_tokens:]) if not model.is_vllm else ids
        print(f"nnterp demo: SmolLM2-135M-Instruct on the {backend} backend", file=out)
        print(f"prompt: {prompt!r}\n", file=out)
        print("logit lens at the last position (final norm + unembedding of each layer's output):", file=out)
        print(format_lens_table(model.tokenizer, probs), file=out)
        print(f"\ngreedy continuation: {prompt!r} + {continuation!r}", file=out)
        return {"lens": probs, "continuation": continuation}
