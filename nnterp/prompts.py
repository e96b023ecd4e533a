"""Prompts with target words, and their probabilities across layers.

A `Prompt` pairs a text with named groups of target words (``{"answer": ["Paris"],
"distractor": ["London", "Rome"]}``). A word counts through the first token of each of
its spellings a model may produce next: with and without a leading space (``" Paris"``
and ``"Paris"``), since after "is" a model writes " Paris" while after a newline it
writes "Paris". `target_probabilities` sums, per layer, the logit-lens probability of
each group's first tokens (each token once), and returns a tidy table: one row per
prompt, group and layer.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import attrs

__all__ = ["Prompt", "first_token_ids", "target_probabilities"]


def _groups(value: Mapping[str, Sequence[str]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    groups = []
    for name, words in dict(value).items():
        words = (words,) if isinstance(words, str) else tuple(words)
        if not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise ValueError(f"target group {name!r} needs non-empty words, got {words!r}")
        groups.append((str(name), words))
    if not groups:
        raise ValueError("a Prompt needs at least one target group")
    return tuple(groups)


@attrs.frozen
class Prompt:
    """A prompt and its target words, grouped by name.

    Example:
        >>> p = Prompt("The capital of France is", {"answer": ["Paris"], "other": ["London", "Rome"]})
        >>> p.group_names
        ('answer', 'other')
    """

    text: str
    targets: tuple[tuple[str, tuple[str, ...]], ...] = attrs.field(converter=_groups)

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.targets)


def first_token_ids(tokenizer: Any, word: str) -> list[int]:
    """The distinct first tokens of ``word`` written with and without a leading space."""
    bare = word.strip()
    ids = []
    for spelling in (" " + bare, bare):
        tokens = tokenizer(spelling, add_special_tokens=False)["input_ids"]
        if tokens and tokens[0] not in ids:
            ids.append(tokens[0])
    return ids


def target_probabilities(model: Any, prompts: Sequence[Prompt], layers: Any = all) -> list[dict[str, Any]]:
    """The logit-lens probability of each target group, per prompt and layer.

    Returns:
        Rows ``{"prompt", "target", "layer", "probability", "tokens"}``, ordered by
        prompt, then group, then layer; ``tokens`` lists the token ids summed.
    """
    from nnterp.interventions import logit_lens

    prompts = list(prompts)
    probs = logit_lens(model, [p.text for p in prompts], layers=layers)  # [n, n_layers, vocab]
    chosen = list(range(model.num_layers)) if layers is all or layers == "all" else (
        [layers] if isinstance(layers, int) else list(layers))
    rows = []
    for index, prompt in enumerate(prompts):
        for name, words in prompt.targets:
            ids = sorted({t for word in words for t in first_token_ids(model.tokenizer, word)})
            for position, layer in enumerate(chosen):
                rows.append({"prompt": prompt.text, "target": name, "layer": layer % model.num_layers,
                             "probability": float(probs[index, position, ids].sum()), "tokens": ids})
    return rows
