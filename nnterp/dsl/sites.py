"""Sites: where in the model a node acts, parsed once from strings like ``"layers[5].output"``.

Users name sites with the strings SPEC.md fixes; nodes parse them into a frozen `Site`
when they are built, so a typo fails at once, at the line that made it, and everything
after construction (validation, lowering, JSON) works with structured fields instead of
re-parsing text. ``str(site)`` gives back the canonical string, which is what ``repr``,
error messages and JSON show.

A negative layer counts from the end. It stays negative in the node, because a node
knows nothing about models; `Site.resolve` turns it into an absolute index once the
number of layers is known.

The vocabulary itself (which modules and sides exist) is `nnterp.sites.SiteKind`; this
module adds the string syntax. It imports attrs and that vocabulary only: never torch,
nnsight, vllm, transformers or json.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import attrs

from nnterp.sites import SiteKind

__all__ = ["Site", "SITE_FORMS"]

_DSL_KINDS = [kind for kind in SiteKind if kind.in_dsl]
#: module -> its sides ("input" before "output"), for modules indexed by layer.
_LAYERED: dict[str, tuple[str, ...]] = {
    module: tuple(sorted(k.side for k in _DSL_KINDS if k.module == module))
    for module in dict.fromkeys(k.module for k in _DSL_KINDS if k.per_layer)
}
#: module -> its sides (None: no side), for modules that exist once per model.
_SINGLE: dict[str, tuple[str | None, ...]] = {
    k.module: (k.side,) for k in _DSL_KINDS if not k.per_layer
}

#: The valid site forms, as shown in error messages.
SITE_FORMS = tuple(k.site("i") for k in sorted(_DSL_KINDS, key=lambda k: not k.per_layer))

# ASCII digits only: int() also accepts other scripts' digits, which are not site syntax.
_LAYERED_RE = re.compile(rf"({'|'.join(_LAYERED)})\[(-?[0-9]+)\]\.(input|output)")
_NUMBER_RE = re.compile(r"-?[0-9]+")
#: Longest layer index accepted, in digits: more is certainly a mistake, and capping it
#: keeps int() away from its very slow (and, past 4300 digits, refused) conversions.
_MAX_DIGITS = 9


def _shorten(text: str, limit: int = 60) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} chars)"


def _valid_forms() -> str:
    return ", ".join(repr(form) for form in SITE_FORMS)


def _suggestion(text: str) -> str:
    """' (did you mean ...?)' for a malformed site string, or ''."""
    number = _NUMBER_RE.search(text)
    layer = number.group(0) if number and len(number.group(0)) <= _MAX_DIGITS + 1 else "0"
    candidates = [form.replace("[i]", f"[{layer}]") for form in SITE_FORMS]
    # Accessor-style names ("layers_output[5]") are a likely slip: offer their site form.
    close = difflib.get_close_matches(text, candidates, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


@attrs.frozen(repr=False)
class Site:
    """A standardized activation of a model: module, layer and side.

    Build one with `Site.parse` (or pass the string to a node, which parses it). The
    fields are what lowering rules dispatch on:

    * ``module``: ``"layers"``, ``"attentions"``, ``"mlps"``, ``"embeddings"`` or
      ``"logits"``;
    * ``layer``: the layer index as written (may be negative), or ``None`` for
      ``embeddings`` and ``logits``;
    * ``side``: ``"input"`` or ``"output"``, or ``None`` for ``logits``.

    Raises:
        TypeError: a field of the wrong type.
        ValueError: a combination that names no site (e.g. ``mlps[3].input``).

    Example:
        >>> site = Site.parse("layers[-1].output")
        >>> site.module, site.layer, site.side
        ('layers', -1, 'output')
        >>> str(site.resolve(num_layers=30))
        'layers[29].output'
        >>> site.accessor
        'layers_output'
        >>> Site.parse("logits") == Site("logits", None, None)
        True
    """

    module: str
    layer: int | None
    side: str | None

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.module, str):
            raise TypeError(f"Site.module must be a str, got {type(self.module).__name__}")
        if self.module in _LAYERED:
            if type(self.layer) is not int:
                raise TypeError(
                    f"Site.layer must be an int for {self.module!r}, got "
                    f"{type(self.layer).__name__} {self.layer!r:.40}"
                )
            sides: tuple[str | None, ...] = _LAYERED[self.module]
        elif self.module in _SINGLE:
            if self.layer is not None:
                raise ValueError(
                    f"{self.module!r} has no layer index, got layer={self.layer!r:.40}; "
                    "pass layer=None"
                )
            sides = _SINGLE[self.module]
        else:
            raise ValueError(
                f"unknown site module {self.module!r:.40}; valid modules: "
                f"{', '.join(repr(m) for m in (*_LAYERED, *_SINGLE))}"
            )
        if self.side not in sides:
            raise ValueError(
                f"{self.module!r} has no side {self.side!r:.40}; valid sites: {_valid_forms()}"
            )

    @classmethod
    def parse(cls, text: str) -> "Site":
        """Parse a site string.

        Raises:
            TypeError: ``text`` is not a string.
            ValueError: not one of the valid forms; the message lists them and suggests
                the closest one.
        """
        if not isinstance(text, str):
            raise TypeError(
                f"a site must be a string such as 'layers[5].output', got "
                f"{type(text).__name__}; valid forms: {_valid_forms()}"
            )
        if text == "logits":
            return cls("logits", None, None)
        if text == "embeddings.output":
            return cls("embeddings", None, "output")
        match = _LAYERED_RE.fullmatch(text)
        if match is not None:
            module, number, side = match.groups()
            digits = number.lstrip("-")
            if len(digits) > _MAX_DIGITS:
                raise ValueError(
                    f"site {_shorten(text)} has a layer index with {len(digits)} digits; "
                    "no model has that many layers"
                )
            if (len(digits) > 1 and digits[0] == "0") or number == "-0":
                raise ValueError(
                    f"site {_shorten(text)}: write the layer index without leading zeros "
                    f"or a minus zero, e.g. '{module}[{int(number)}].{side}'"
                )
            if side not in _LAYERED[module]:
                raise ValueError(
                    f"site {_shorten(text)} does not exist: {module} have only an "
                    f"{' and an '.join(_LAYERED[module])}; valid forms: {_valid_forms()}"
                )
            return cls(module, int(number), side)
        raise ValueError(
            f"malformed site {_shorten(text)}; valid forms: {_valid_forms()} "
            f"(i is a layer index, negative counts from the end){_suggestion(text[:200])}"
        )

    @classmethod
    def coerce(cls, value: Any) -> "Site":
        """A `Site` as is, or a string parsed with `Site.parse`."""
        if isinstance(value, Site):
            return value
        return cls.parse(value)

    @property
    def kind(self) -> SiteKind:
        """The `nnterp.sites.SiteKind` this site is an instance of."""
        return SiteKind.for_site(self.module, self.side)

    @property
    def per_layer(self) -> bool:
        """Whether the site has a layer index (every module but embeddings and logits)."""
        return self.layer is not None

    @property
    def accessor(self) -> str:
        """The `StandardizedTransformer` accessor name: ``"layers_output"``, ``"logits"``..."""
        return self.kind.value

    @property
    def width(self) -> str:
        """What the last dimension of this site's activation counts: ``"hidden_size"``
        for every site but ``logits``, which is ``"vocab_size"``."""
        return self.kind.width

    def order(self, num_layers: int) -> tuple[int, int]:
        """Sort key of this (resolved) site in one forward pass; see `SiteKind.order`."""
        return self.kind.order(self.layer, num_layers)

    def resolve(self, num_layers: int) -> "Site":
        """The same site with a non-negative layer index, for a model of ``num_layers``.

        Raises:
            ValueError: the layer is out of range (validation reports this earlier,
                with the node that holds the site).
        """
        if self.layer is None:
            return self
        if not -num_layers <= self.layer < num_layers:
            raise ValueError(
                f"site {str(self)!r} is out of range for a model with {num_layers} layers "
                f"(valid: {-num_layers} .. {num_layers - 1})"
            )
        return attrs.evolve(self, layer=self.layer % num_layers)

    def __str__(self) -> str:
        return self.kind.site(self.layer)

    def __repr__(self) -> str:
        return f"Site.parse({str(self)!r})"
