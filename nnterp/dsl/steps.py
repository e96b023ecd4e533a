"""When and where a node acts: the one definition of steps and positions.

A run's forward passes are its *steps*: step 0 is the prompt pass, which holds every
prompt token; each later step is one generated token's pass, which holds only that new
token. A node names its steps as an int, a tuple of ints or ``"all"``, and its positions
as an int, a tuple of ints (negative counts from the prompt's end) or ``None`` (every
token the pass holds). Validation, lowering and both executors answer "does this node act
here?" through the functions below, so the rules are written once:

- a node acts at a step its ``steps`` names (`acts_at`, `acts_at_each` for a batch);
- a generated step's pass holds only the new token, which positions ``None`` and ``-1``
  name; any other position names nothing there (`reaches_generated_token`);
- ``Steer(..., positions=None)`` acts at every step, a positioned steer in the prompt pass
  only (`steer_steps`).
"""

from __future__ import annotations

from typing import Literal, Union

import numpy as np

__all__ = ["Steps", "Positions", "acts_at", "acts_at_each", "includes_prompt_pass", "last_step", "is_multi_step",
           "steer_steps", "wanted_positions", "reaches_generated_token"]

#: the forward passes a node acts in
Steps = Union[int, tuple[int, ...], Literal["all"]]
#: the tokens of a pass a node acts on (None: every token the pass holds)
Positions = Union[int, tuple[int, ...], None]


def acts_at(steps: Steps, step: int) -> bool:
    """Whether a node with ``steps`` acts in forward pass ``step``."""
    if steps == "all":
        return True
    if isinstance(steps, tuple):
        return step in steps
    return step == steps


def acts_at_each(steps: Steps, step: np.ndarray) -> np.ndarray:
    """`acts_at` for an array of steps (one per token of a batch)."""
    if steps == "all":
        return np.ones(np.shape(step), dtype=bool)
    if isinstance(steps, tuple):
        return np.isin(step, steps)
    return np.asarray(step == steps)


def includes_prompt_pass(steps: Steps) -> bool:
    return acts_at(steps, 0)


def is_multi_step(steps: Steps) -> bool:
    """Whether ``steps`` may name more than one pass (its results then gain a step axis)."""
    return steps == "all" or isinstance(steps, tuple)


def last_step(steps: Steps, max_tokens: int) -> int:
    """The last pass ``steps`` names, in a run that generates ``max_tokens`` tokens
    (passes 0 .. max_tokens - 1)."""
    if steps == "all":
        return max_tokens - 1
    if isinstance(steps, tuple):
        return max(steps)
    return steps


def steer_steps(positions: Positions) -> Steps:
    """The passes a steer acts in: every one without positions, the prompt pass with them."""
    return "all" if positions is None else 0


def wanted_positions(positions: Positions) -> tuple[int, ...] | None:
    """``positions`` as a tuple, or None for every token."""
    return None if positions is None else ((positions,) if isinstance(positions, int) else tuple(positions))


def reaches_generated_token(positions: Positions) -> bool:
    """Whether ``positions`` names the one token of a generated step's pass (``None``, or
    only ``-1``)."""
    wanted = wanted_positions(positions)
    return wanted is None or all(p == -1 for p in wanted)
