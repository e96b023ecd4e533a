"""The classic function API, as thin sugar over the DSL: one execution path.

Each function builds a graph of `nnterp.dsl` nodes and calls `nnterp.dsl.run`, so it
runs on both backends, validates before anything runs, and means exactly what the DSL
means. Sampling settings (``temperature``, ``top_p``, ``max_tokens``, ``seed``) are
vLLM's, honoured by both backends.

Example:
    >>> from nnterp import StandardizedTransformer                     # doctest: +SKIP
    >>> from nnterp.interventions import logit_lens
    >>> model = StandardizedTransformer("bundled")
    >>> probs = logit_lens(model, ["The capital of France is"])        # [1, 30, vocab]
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from nnterp.dsl import Graph, Lens, Patch, Read, Sampling, Steer, run
from nnterp.errors import renamed_argument

__all__ = ["logit_lens", "patchscope_lens", "patchscope_generate", "steer", "identity_prompt",
           "IDENTITY_PROMPT"]

#: The Patchscopes identity prompt: a few "x -> x" pairs, ending where the patched
#: latent is decoded.
IDENTITY_PROMPT = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"


def identity_prompt(examples: Sequence[str] = ("cat", "1135", "hello"), placeholder: str = "?") -> str:
    """An identity-style target prompt (``"cat -> cat\\n...\\n?"``) for patchscopes.

    The model continues "x -> " with x, so a latent patched at the placeholder is
    decoded as whatever token it represents.
    """
    return "".join(f"{word} -> {word}\n" for word in examples) + placeholder


def _sampling(max_tokens: int, temperature: float, top_p: float, seed: int | None) -> Sampling:
    return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)


def _prompts(prompts: str | Sequence[str]) -> list[str]:
    return [prompts] if isinstance(prompts, str) else list(prompts)


def _layer_list(model: Any, layers: Any) -> list[int]:
    if layers is all or layers == "all" or layers is None:
        return list(range(model.num_layers))
    if isinstance(layers, int):
        return [layers % model.num_layers]
    return [layer % model.num_layers for layer in layers]


def logit_lens(model: Any, prompts: str | Sequence[str], layers: Any = all, positions: Any = -1,
               top_k: int | None = None, *, temperature: float = 0.0, top_p: float = 1.0,
               max_tokens: int = 1, seed: int | None = None) -> Any:
    """The logit lens: each chosen layer's residual stream through the final norm and
    the unembedding, as next-token probabilities.

    Returns:
        ``[n_prompts, n_layers, vocab]`` (a list of positions adds an axis after the
        layers), or with ``top_k`` a ``(probs, token_ids)`` pair of
        ``[n_prompts, n_layers, top_k]``.
    """
    lens = Lens(layers=layers if layers is all else _layer_list(model, layers), positions=positions, top_k=top_k)
    return run(lens, model, _prompts(prompts), sampling=_sampling(max_tokens, temperature, top_p, seed))["lens"]


def _source_latents(model: Any, source_prompts: list[str], layers: list[int], source_position: int) -> dict:
    """Each source prompt's residual stream at ``source_position``, per layer: one run."""
    reads = Graph(tuple(Read(f"layers[{layer}].output", positions=source_position, name=f"layer{layer}")
                        for layer in layers))
    result = run(reads, model, source_prompts)
    return {layer: result[f"layer{layer}"] for layer in layers}  # [n_sources, hidden] each


def patchscope_lens(model: Any, source_prompts: str | Sequence[str], target_prompt: str | None = None,
                    layers: Any = all, source_position: int = -1, target_position: int = -1,
                    top_k: int | None = None, *, temperature: float = 0.0, top_p: float = 1.0,
                    max_tokens: int = 1, seed: int | None = None) -> Any:
    """Decode latents by patching them into a target prompt (Patchscopes).

    For every source prompt and chosen layer, the source's residual stream after that
    layer at ``source_position`` replaces the target's at ``target_position`` in the
    same layer, and the target's next-token distribution is read.

    Args:
        target_prompt: defaults to `IDENTITY_PROMPT`.

    Returns:
        ``[n_sources, n_layers, vocab]`` probabilities, or with ``top_k`` a
        ``(probs, token_ids)`` pair of ``[n_sources, n_layers, top_k]``.
    """
    sources = _prompts(source_prompts)
    target = IDENTITY_PROMPT if target_prompt is None else target_prompt
    chosen = _layer_list(model, layers)
    latents = _source_latents(model, sources, chosen, source_position)
    sampling = _sampling(max_tokens, temperature, top_p, seed)
    rows = []
    for index in range(len(sources)):
        per_layer = []
        for layer in chosen:
            graph = Patch(f"layers[{layer}].output", value=latents[layer][index], positions=target_position) \
                >> Read("logits")
            logits = run(graph, model, target, sampling=sampling)["logits"][0]
            per_layer.append(torch.softmax(logits.float(), dim=-1))
        rows.append(torch.stack(per_layer))
    probs = torch.stack(rows)
    if top_k is None:
        return probs
    top = probs.topk(top_k, dim=-1)
    return top.values, top.indices


def patchscope_generate(model: Any, prompts: str | Sequence[str], target_prompt: str | None = None,
                        layers: Any = all, source_position: int = -1, target_position: int = -1, *,
                        max_tokens: int = 10, temperature: float = 0.0, top_p: float = 1.0,
                        seed: int | None = None) -> dict[int, list[str]]:
    """Generate from the target prompt with each source latent patched in, per layer.

    Returns:
        ``{layer: [continuation text per source prompt]}``.
    """
    sources = _prompts(prompts)
    target = IDENTITY_PROMPT if target_prompt is None else target_prompt
    chosen = _layer_list(model, layers)
    latents = _source_latents(model, sources, chosen, source_position)
    sampling = _sampling(max_tokens, temperature, top_p, seed)
    texts: dict[int, list[str]] = {}
    for layer in chosen:
        texts[layer] = []
        for index in range(len(sources)):
            patch = Patch(f"layers[{layer}].output", value=latents[layer][index], positions=target_position)
            texts[layer].append(run(patch, model, target, sampling=sampling).texts[0])
    return texts


def steer(model: Any, prompts: str | Sequence[str], layer: int | Sequence[int], vector: torch.Tensor,
          scale: float = 1.0, positions: Any = None, *, max_tokens: int = 10, temperature: float = 0.0,
          top_p: float = 1.0, seed: int | None = None, factor: float | None = None):
    """Generate with ``scale * vector`` added to the residual stream after ``layer``.

    With ``positions=None`` the vector is added at every prompt position and at every
    generated token. ``factor=`` is the old name of ``scale=`` (deprecated).

    Returns:
        The `RunResult`: ``.texts`` and ``.tokens`` per prompt.
    """
    scale = renamed_argument("steer", "factor", factor, "scale", scale, default=1.0)
    layers = [layer] if isinstance(layer, int) else list(layer)
    graph = Graph(tuple(Steer(l, vector, scale=scale, positions=positions) for l in layers))
    return run(graph, model, _prompts(prompts), sampling=_sampling(max_tokens, temperature, top_p, seed))
