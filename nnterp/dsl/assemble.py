"""A run's recorded values in the shapes SPEC.md gives: one entry per output.

`assemble` turns what an executor recorded (`nnterp.dsl.recorded.Recorded`, keyed by
`OutputKey`) into each output's value: a stack ``[n_prompts, ...]`` where every prompt
has the same shape, a list per prompt where they differ (``positions=None``), a list of
steps per prompt for ``steps="all"``, and ``(probs, ids)`` pairs for a lens with
``top_k``. Whole stacks come straight from the store where it holds them so
(`Recorded.stacked`); other values are read key by key.
"""

from __future__ import annotations

from typing import Any

import torch

from nnterp.dsl.plan import Output, OutputKey, OutputKind, Plan
from nnterp.dsl.recorded import Execution, Recorded

__all__ = ["assemble", "drop_ended_steps"]


def drop_ended_steps(execution: Execution) -> Recorded:
    # A prompt whose generation ended early (end of sequence) has no later steps. vLLM
    # stops computing it; an HF batch goes on feeding it padding, whose activations
    # mean nothing: drop them, so both backends return the same steps.
    return execution.values.before_end([max(1, len(row)) for row in execution.tokens])


def _stack(values: list[Any]) -> Any:
    if values and all(isinstance(v, torch.Tensor) for v in values) and len({v.shape for v in values}) == 1:
        return torch.stack(values)
    return values


def _value_at(output: Output, values: Recorded, prompt: int, step: int) -> Any:
    if output.kind is not OutputKind.LENS:
        return values.get(OutputKey(output.name, step=step, prompt=prompt))
    per_layer = [values.get(OutputKey(output.name, step=step, prompt=prompt, layer=layer))
                 for layer in output.layers]
    if any(v is None for v in per_layer):
        return None
    if output.top_k is not None:
        return (torch.stack([v[0] for v in per_layer]), torch.stack([v[1] for v in per_layer]))
    return torch.stack(per_layer)


def _pairs(items: list[Any]) -> tuple[Any, Any]:
    """A list of ``(probs, ids)`` pairs as a pair of stacks (a lens with top_k)."""
    return _stack([item[0] for item in items]), _stack([item[1] for item in items])


def _stacked(output: Output, values: Recorded, n_prompts: int) -> Any | None:
    """The output as the store already holds it, stacked over prompts (and lens layers),
    or None when it must be read key by key."""
    if output.kind is not OutputKind.LENS:
        return values.stacked(output.name, None, output.steps, n_prompts)
    per_layer = [values.stacked(output.name, layer, output.steps, n_prompts) for layer in output.layers]
    if not per_layer or any(v is None for v in per_layer):
        return None
    if output.top_k is not None:
        return (torch.stack([v[0] for v in per_layer], dim=1), torch.stack([v[1] for v in per_layer], dim=1))
    return torch.stack(per_layer, dim=1)


def assemble(plan: Plan, values: Recorded, n_prompts: int) -> dict[str, Any]:
    steps_taken: dict[tuple[str, int], set[int]] | None = None
    outputs: dict[str, Any] = {}
    for output in plan.outputs:
        pairs = output.kind is OutputKind.LENS and output.top_k is not None
        if output.multi_step:
            if steps_taken is None:
                steps_taken = {}
                for key in values:
                    steps_taken.setdefault((key.name, key.prompt), set()).add(key.step)
            per_prompt = [[_value_at(output, values, prompt, step)
                           for step in sorted(steps_taken.get((output.name, prompt), ()))]
                          for prompt in range(n_prompts)]
            outputs[output.name] = [_pairs(steps) if pairs else _stack(steps) for steps in per_prompt]
            continue
        stacks = output.kind is not OutputKind.ATTENTION_PROBS and output.positions is not None
        whole = _stacked(output, values, n_prompts) if stacks else None
        if whole is not None:
            outputs[output.name] = whole
            continue
        per_prompt = []
        for prompt in range(n_prompts):
            value = _value_at(output, values, prompt, output.steps)
            if value is None:
                raise RuntimeError(
                    f"output {output.name!r}: no value for prompts[{prompt}] at step {output.steps} "
                    f"(did generation stop before that step?)"
                )
            per_prompt.append(value)
        if pairs:
            outputs[output.name] = _pairs(per_prompt)
        elif not stacks:
            outputs[output.name] = per_prompt
        else:
            outputs[output.name] = _stack(per_prompt)
    return outputs
