"""The load-time check that the standardized sites hold what they claim.

A family nnterp maps by guessing its module paths (or by the user's ``ModulePaths``) can
resolve every path and still be wrong: a layer returning something else, an MLP path
pointing at a sub-projection, an attention module that adds the residual itself (Bloom),
an MLP output that also carries the attention's (Falcon's parallel decoder). Each of
these gives values of the right shape that mean something else. So a probe prompt is run
once at load, every site is read, and two identities are checked on what came back:

- each layer's input plus what its attention and MLP add is the layer's output (the
  residual identity that ``attentions_output`` and ``mlps_output`` promise);
- the logit lens of the last layer is the logits (``final_norm`` and ``lm_head`` are the
  model's own).

Both backends run the same check through their own ``trace`` and ``read``: the values are
saved inside the trace and judged outside it, where they are ordinary tensors.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from nnterp.errors import ArchitectureNotSupportedError
from nnterp.rename import mapping_error_message
from nnterp.sites import SiteKind

__all__ = ["PROBE_TEXT", "check_sites", "warn_untested"]

PROBE_TEXT = "The quick brown fox"

_LAYER_KINDS = (SiteKind.LAYERS_INPUT, SiteKind.ATTENTIONS_OUTPUT, SiteKind.MLPS_OUTPUT, SiteKind.LAYERS_OUTPUT)


def check_sites(backend: Any, trace: Callable[[str], Any], *, model_type: str, class_name: str,
                hidden: int, n_tokens: int, vocab: int | None, logits_every_position: bool,
                attention_probabilities: bool = False) -> None:
    """Read every site of ``backend`` on the probe and raise if one is not what it claims.

    Args:
        backend: the backend, with ``read``, ``project_on_vocab`` and ``num_layers``.
        trace: opens a trace of one prompt on the backend's model.
        hidden: the residual stream's width.
        n_tokens: how many tokens the probe has.
        vocab: the unembedding's width, or None when it cannot be told before the run.
        logits_every_position: HF's logits cover every position; vLLM's only the last.
        attention_probabilities: also check ``attention_probabilities`` (HF, eager attention).

    Raises:
        ArchitectureNotSupportedError: every problem found, and how to map the model.
    """
    import nnsight

    num_layers = backend.num_layers
    kinds = list(_LAYER_KINDS)
    if attention_probabilities:
        kinds.insert(1, SiteKind.ATTENTION_PROBABILITIES)
    with torch.no_grad(), trace(PROBE_TEXT):
        seen = nnsight.save({})
        seen["embeddings_output"] = backend.read(SiteKind.EMBEDDINGS_OUTPUT, None)
        for layer in range(num_layers):
            for kind in kinds:
                seen[f"{kind.value}[{layer}]"] = backend.read(kind, layer)
        seen["logits"] = backend.read(SiteKind.LOGITS, None)
        last = seen[f"{SiteKind.LAYERS_OUTPUT.value}[{num_layers - 1}]"]
        if isinstance(last, torch.Tensor) and last.ndim == 3:
            seen["lens"] = backend.project_on_vocab(last[:, -1:])
    seen = dict(seen)
    lens = seen.pop("lens", None)
    problems = _shape_problems(seen, hidden, n_tokens, vocab, logits_every_position)
    if not problems:
        problems = _meaning_problems(seen, lens, num_layers)
    if problems:
        raise ArchitectureNotSupportedError(mapping_error_message(model_type, class_name, problems))


def _shape_problems(seen: dict, hidden: int, n_tokens: int, vocab: int | None,
                    logits_every_position: bool) -> list[str]:
    problems = []
    for key, value in seen.items():
        if key.startswith(SiteKind.ATTENTION_PROBABILITIES.value):
            want = f"[1, heads, {n_tokens}, {n_tokens}], rows summing to 1"
            ok = _is_tensor(value, 4) and value.shape[0] == 1 and tuple(value.shape[2:]) == (n_tokens, n_tokens) \
                and _rows_sum_to_one(value)
        elif key == "logits":
            positions = n_tokens if logits_every_position else 1
            want = f"[1, {positions}, {vocab or 'vocab'}]"
            ok = _is_tensor(value, 3) and tuple(value.shape[:2]) == (1, positions) \
                and (vocab is None or value.shape[2] == vocab)
        else:
            want = f"[1, {n_tokens}, {hidden}]"
            ok = _is_tensor(value, 3) and tuple(value.shape) == (1, n_tokens, hidden)
        if not ok:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            problems.append(f"{key}: expected a tensor {want}, got {got}")
    return problems


def _meaning_problems(seen: dict, lens: Any, num_layers: int) -> list[str]:
    """The residual identity at every layer, and the last layer's lens against the logits."""
    dtype = seen[f"{SiteKind.LAYERS_OUTPUT.value}[0]"].dtype
    # float32 sums three tensors exactly enough for 1e-4; a 16-bit dtype rounds each term
    tolerance = 1e-4 if torch.finfo(dtype).bits >= 32 else 2e-2
    problems = []
    for layer in range(num_layers):
        inputs, attention, mlp, out = (seen[f"{kind.value}[{layer}]"] for kind in _LAYER_KINDS)
        error = _relative_error(inputs + attention + mlp, out)
        if not error <= tolerance:
            problems.append(
                f"layers[{layer}]: layers_input + attentions_output + mlps_output differs from layers_output "
                f"by {error:.2g} of its scale (at most {tolerance:g}): the attention or MLP module is not what "
                f"the layer adds to the residual stream (a norm after it, or a residual added inside it)")
    logits = seen["logits"][:, -1:]
    if isinstance(lens, torch.Tensor) and lens.shape == logits.shape:
        error = _relative_error(lens, logits)
        if not error <= tolerance:
            problems.append(f"logits: the final norm and unembedding of layers_output[{num_layers - 1}] differ from "
                            f"the logits by {error:.2g} of their scale (at most {tolerance:g}): final_norm or lm_head "
                            "is not the model's")
    return problems


def _is_tensor(value: Any, ndim: int) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim == ndim


def _rows_sum_to_one(value: torch.Tensor) -> bool:
    # each probability is rounded to the model's dtype, so a row's sum is off by up to
    # about one rounding step of 1 (bfloat16: 2**-8); a few steps of margin
    atol = max(1e-3, 4 * torch.finfo(value.dtype).eps) if value.is_floating_point() else 1e-3
    return bool(torch.allclose(value.float().sum(-1), torch.ones((), dtype=torch.float32), atol=atol))


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| over max |want|, in float32."""
    got, want = got.float().cpu(), want.float().cpu()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))


#: the untested families already warned about in this process
_WARNED: set[str] = set()


def warn_untested(model_type: str, checked: bool) -> None:
    """Warn once per process about a family nnterp was never tested on."""
    if model_type in _WARNED:
        return
    _WARNED.add(model_type)
    passed = ("its sites passed the load checks (shapes, the residual identity, the last layer's lens)"
              if checked else "its load checks were skipped (check=False)")
    warnings.warn(f"nnterp was never tested on model_type {model_type!r}; {passed}, and the module paths "
                  f"were guessed: compare a few values with the model's own before relying on them",
                  UserWarning, stacklevel=4)
