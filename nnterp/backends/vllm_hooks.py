"""The device side of the batch-wide vLLM executor: the tables the hooks read, and the hooks.

A hook sits on every hooked site from the moment the model is loaded, before vLLM
compiles it or captures CUDA graphs, so it may only read and write tensors at fixed
addresses: per site and token an edit ``x -> a * x + b`` (``b`` a row of a vector table)
and a destination row in a capture buffer (`DeviceState`). It contains no ``.item()``,
no ``.cpu()`` and no Python branch on data, so it compiles and replays. The host fills
the tables before every step (`nnterp.backends.vllm_batch`).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["DeviceState", "Staging", "after_module", "before_layer"]


class DeviceState(torch.nn.Module):
    """Fixed-address tables the hooks read; the host fills them before every step.

    Attributes (buffers): ``scale[site, token]`` and ``row[site, token]`` (the edit
    ``a * x + vector[row]``), ``dest[site, token]`` (the capture row; rows past
    ``capacity`` are a dump, one per token, so writes never collide), ``vector``
    (row 0 is zeros) and ``captured``.
    """

    def __init__(self, sites: int, tokens: int, hidden: int, vector_rows: int, capacity: int,
                 dtype: torch.dtype, device: torch.device, eager: bool) -> None:
        super().__init__()
        self.tokens, self.capacity, self.eager = tokens, capacity, eager
        #: per site: whether the current step edits or reads there (eager engines only)
        self.active = [False] * sites
        self.register_buffer("scale", torch.ones(sites, tokens, dtype=torch.float32, device=device),
                             persistent=False)
        self.register_buffer("row", torch.zeros(sites, tokens, dtype=torch.long, device=device), persistent=False)
        dump = capacity + torch.arange(tokens, device=device)
        self.register_buffer("dest", dump.repeat(sites, 1), persistent=False)
        self.register_buffer("vector", torch.zeros(vector_rows, hidden, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("captured", torch.zeros(capacity + tokens, hidden, dtype=dtype, device=device),
                             persistent=False)


def _split(value: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden, residual) of a module's output or a layer's input; the stream is their sum.

    Views of ``[tokens, hidden]``: vLLM's generic transformers back end keeps Hugging
    Face's batch of one, ``[1, tokens, hidden]``; its view shares the memory, so an
    in-place edit of it edits the model's tensor."""
    if isinstance(value, tuple):
        residual = value[1] if len(value) > 1 and isinstance(value[1], torch.Tensor) else None
        hidden = value[0]
    else:
        hidden, residual = value, None
    if hidden.dim() == 3:
        hidden = hidden[0]
        residual = residual[0] if residual is not None else None
    return hidden, residual


def _apply(state: DeviceState, site: int, hidden: torch.Tensor, residual: torch.Tensor | None,
           multiplier: torch.Tensor | None = None) -> None:
    # Capture the raw stream, then edit it in place: the graph reads its own memory, so
    # an in-place edit is what a replayed CUDA graph sees. `multiplier`: the site's value
    # is the module's output times it (vLLM's Gemma scales its embeddings after the
    # module), so reads see the product and an edit's vector is divided by it.
    n = hidden.shape[0]
    stream = hidden if residual is None else hidden + residual
    if multiplier is not None:
        stream = stream * multiplier
    state.captured.index_copy_(0, state.dest[site, :n], stream)
    scale = state.scale[site, :n, None].to(hidden.dtype)
    vector = state.vector[state.row[site, :n]]
    hidden.mul_(scale).add_(vector if multiplier is None else vector / multiplier)
    if residual is not None:
        residual.mul_(scale)


def after_module(site: int, multiplier: torch.Tensor | None, module: torch.nn.Module, args: Any,
                  output: Any) -> None:
    state = module.nnterp_state
    if state.eager and not state.active[site]:
        return None
    hidden, residual = _split(output)
    _apply(state, site, hidden, residual, multiplier)
    return None


def before_layer(site: int, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    state = module.nnterp_state
    if state.eager and not state.active[site]:
        return None
    # Llama-family layers take (positions, hidden, residual), GPT-2 blocks (hidden,);
    # Hugging Face layers (vLLM's transformers back end) may take hidden_states by name
    tensors = [arg for arg in args if isinstance(arg, torch.Tensor)]
    at = next((i for i, arg in enumerate(tensors) if arg.is_floating_point()), None)
    if at is None:
        hidden, residual = _split(kwargs["hidden_states"])
    else:
        # the residual follows the hidden states, and has their shape (a mask would not)
        following = tensors[at + 1] if at + 1 < len(tensors) else None
        residual = following if following is not None and following.shape == tensors[at].shape else None
        hidden, residual = _split((tensors[at], residual))
    _apply(state, site, hidden, residual)
    return None


class Staging:
    """Host copies of `DeviceState`'s per-token tables, filled each step and copied to
    the device."""

    def __init__(self, sites: int, tokens: int, dump: torch.Tensor, pin: bool) -> None:
        self.scale = torch.ones(sites, tokens, dtype=torch.float32, pin_memory=pin)
        self.row = torch.zeros(sites, tokens, dtype=torch.long, pin_memory=pin)
        self.dest = dump.repeat(sites, 1)
        if pin:
            self.dest = self.dest.pin_memory()
        self.copied = torch.cuda.Event() if pin else None
        #: sites whose rows here are not neutral
        self.dirty: set[int] = set()
        #: site -> what its rows here hold, where that can be named (a constant steer:
        #: its row, the step's width and which tokens are the plan's); absent otherwise.
        #: Decoding repeats the same tables step after step: a site that holds them
        #: already is not rewritten.
        self.held: dict[int, tuple] = {}

    def neutral(self, site: int, dump: torch.Tensor) -> None:
        self.scale[site].fill_(1.0)
        self.row[site].zero_()
        self.dest[site].copy_(dump)
        self.held.pop(site, None)
