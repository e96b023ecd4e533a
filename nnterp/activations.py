"""Activation collection over many prompts, as DSL reads: one execution path.

`get_token_activations` reads one site of every chosen layer at chosen token positions
for a list of prompts in one run; `collect_token_activations_batched` does the same in
batches with a progress bar, so memory stays bounded: each batch's results are already
on the CPU (the DSL copies results off the device as it reads them) and only those are
kept. Both give ``[n_layers, n_prompts, hidden]`` (a list of positions adds an axis).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from nnterp.dsl import Graph, Read, Sampling, run

from nnterp.sites import SiteKind

__all__ = ["get_token_activations", "collect_token_activations_batched", "SITES"]

#: The sites collected per layer, by accessor name (``"layers_output"``...).
SITES = {kind.value: kind for kind in SiteKind if kind.per_layer and kind.in_dsl}


def _graph(model: Any, layers: Any, positions: Any, site: str) -> tuple[Graph, list[int]]:
    if site not in SITES:
        raise ValueError(f"site must be one of {', '.join(SITES)}, got {site!r}")
    if positions is None:
        raise ValueError("positions=None (every token) gives prompts different lengths; choose positions")
    chosen = list(range(model.num_layers)) if layers is None or layers is all or layers == "all" else (
        [layers] if isinstance(layers, int) else list(layers))
    graph = Graph(tuple(Read(SITES[site].site(layer), positions=positions, name=f"layer{i}")
                        for i, layer in enumerate(chosen)))
    return graph, chosen


def get_token_activations(model: Any, prompts: str | Sequence[str], layers: Any = None, positions: Any = -1,
                          site: str = "layers_output", *, temperature: float = 0.0, top_p: float = 1.0,
                          max_tokens: int = 1) -> torch.Tensor:
    """Activations at ``positions`` of every chosen layer, for each prompt.

    Args:
        layers: layer indices (default: all).
        positions: an int or a list of ints (token indices of each prompt).
        site: ``"layers_output"`` (the residual stream), ``"layers_input"``,
            ``"attentions_output"`` or ``"mlps_output"``.

    Returns:
        ``[n_layers, n_prompts, hidden]`` (``[n_layers, n_prompts, k, hidden]`` for k
        positions), on the CPU.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    graph, chosen = _graph(model, layers, positions, site)
    result = run(graph, model, prompts, sampling=Sampling(max_tokens=max_tokens, temperature=temperature,
                                                         top_p=top_p))
    return torch.stack([result[f"layer{i}"] for i in range(len(chosen))])


def collect_token_activations_batched(model: Any, prompts: Any, batch_size: int = 32,
                                      layers: Any = None, positions: Any = -1, site: str = "layers_output",
                                      progress: bool = True, *, out: Any = None, shard_prompts: int | None = None,
                                      **sampling: Any) -> Any:
    """`get_token_activations` in batches of ``batch_size`` prompts, with a progress bar.

    Results are identical to the unbatched call (each prompt's activations do not
    depend on the others in its batch), and memory holds one batch of the model's
    working set plus the collected CPU results.

    With ``out=DIR`` the activations stream to disk instead (``run(..., out=DIR)``):
    ``prompts`` may then be any iterable, a file or a dataset column, memory holds two
    shards of ``shard_prompts`` prompts whatever their number, a killed collection
    resumes where it stopped, and the result is the directory's
    `nnterp.dsl.stored.StoredResult`, whose output ``"layer{i}"`` is the ``i``-th chosen
    layer's ``[n_prompts, hidden]`` (read a shard at a time with ``.batches``).
    """
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if out is not None:
        graph, _ = _graph(model, layers, positions, site)
        return run(graph, model, prompts, sampling=Sampling(**_sampling(sampling)), out=out,
                   shard_prompts=shard_prompts, progress=progress)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("collect_token_activations_batched: no prompts given; pass a non-empty list")
    parts = []
    with tqdm(total=len(prompts), desc="activations", unit="prompt", disable=not progress) as bar:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            parts.append(get_token_activations(model, batch, layers=layers, positions=positions, site=site,
                                               **sampling))
            bar.update(len(batch))
    return torch.cat(parts, dim=1)


def _sampling(options: dict) -> dict:
    unknown = set(options) - {"temperature", "top_p", "max_tokens"}
    if unknown:
        raise TypeError(f"collect_token_activations_batched: unexpected argument(s) {', '.join(sorted(unknown))}; "
                        "sampling takes temperature, top_p and max_tokens")
    return options
