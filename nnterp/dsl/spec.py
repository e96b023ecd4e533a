"""`ModelSpec`: the few facts about a model that validation needs, as a frozen value.

Validation must work without a loaded model (``nnterp validate GRAPH --model M`` reads
only the configuration), so rules never see a model: they see a `ModelSpec`. It is built
from a loaded `StandardizedTransformer` (`ModelSpec.from_model`, duck-typed, so this
module needs no import of it), from a transformers configuration
(`ModelSpec.from_config`), or written by hand in tests and examples.

What a backend can do is data too, declared by the backend itself in
`nnterp.limits`: `ModelSpec.limits` is that declaration, and
`ModelSpec.supported` the node types it leaves, so "Grad on vLLM" is an ordinary
validation problem, with the backend's own explanation and fix.

This module never imports nnsight, vllm, transformers, json or the backends' code (the
limits tables are plain data).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from nnterp.dsl.nodes import NODE_TYPES, Node
from nnterp.limits import BACKENDS, BackendLimits, limits_for
from nnterp.sites import SiteKind

__all__ = ["ModelSpec", "supported_by", "backends_supporting", "DescribedModel"]


def supported_by(backend: str) -> frozenset[type[Node]]:
    """The node types ``backend`` can run (an unknown backend is refused by
    `ModelSpec`'s own check, which runs after this default is computed)."""
    unsupported = BACKENDS[backend].nodes if backend in BACKENDS else {}
    return frozenset(t for t in NODE_TYPES if t.__name__ not in unsupported)


def backends_supporting(node_type: type[Node]) -> tuple[str, ...]:
    """The backends that can run ``node_type``, e.g. ``("hf",)`` for `Grad`."""
    return tuple(name for name, limits in BACKENDS.items() if node_type.__name__ not in limits.nodes)


def _positive_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if type(value) is not int:
        raise TypeError(
            f"ModelSpec.{attribute.name} must be an int, got {type(value).__name__} {value!r:.40}",
            attribute,
            int,
            value,
        )
    if value < 1:
        raise ValueError(f"ModelSpec.{attribute.name} must be >= 1, got {value}")


def _backend_name(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    try:
        limits_for(value)
    except ValueError as err:
        raise ValueError(f"ModelSpec.backend: {err}") from None


def _bool(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if type(value) is not bool:
        raise TypeError(f"ModelSpec.{attribute.name} must be a bool, got {type(value).__name__}")


def _node_types(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    bad = [t for t in value if not (isinstance(t, type) and issubclass(t, Node))]
    if bad:
        raise TypeError(f"ModelSpec.supported must hold node classes, got {bad[0]!r:.60}")


@attrs.frozen
class ModelSpec:
    """What validation knows about a model: sizes, backend and what the backend runs.

    Args:
        num_layers: number of transformer layers.
        hidden_size: width of the residual stream.
        num_heads: attention heads per layer.
        vocab_size: size of the output vocabulary (width of ``logits``).
        backend: ``"hf"`` or ``"vllm"``.
        attention_probs_enabled: whether the model was loaded so that attention
            probabilities can be read (``enable_attention_probs=True``, HF only).
        supported: node types the backend runs; by default those its `limits` leave
            (vLLM lacks `Grad` and `AttentionProbs`).

    Example:
        >>> from nnterp.dsl import Grad
        >>> spec = ModelSpec(num_layers=30, hidden_size=576, num_heads=9, vocab_size=49152)
        >>> spec.backend, Grad in spec.supported
        ('hf', True)
        >>> vllm = ModelSpec(30, 576, 9, 49152, backend="vllm")
        >>> Grad in vllm.supported, vllm.limits.nodes["Grad"].why
        (False, 'vLLM runs inference kernels that keep no autograd graph')
    """

    num_layers: int = attrs.field(validator=_positive_int)
    hidden_size: int = attrs.field(validator=_positive_int)
    num_heads: int = attrs.field(validator=_positive_int)
    vocab_size: int = attrs.field(validator=_positive_int)
    backend: str = attrs.field(default="hf", validator=_backend_name)
    attention_probs_enabled: bool = attrs.field(default=False, validator=_bool)
    #: the most tokens (prompt plus generated) one sequence may hold, where the backend
    #: enforces it (a vLLM engine); None: no limit known
    max_model_len: int | None = attrs.field(default=None, kw_only=True)
    #: the site kinds the engine serves (a CUDA-graph engine: those it hooked when it
    #: was compiled); None: every site
    served_sites: frozenset[SiteKind] | None = attrs.field(
        default=None, kw_only=True, converter=lambda kinds: None if kinds is None else frozenset(kinds))
    #: rows of the engine's table of edit vectors (vLLM's batched executor); None: no limit
    vector_rows: int | None = attrs.field(default=None, kw_only=True)
    supported: frozenset[type[Node]] = attrs.field(
        default=attrs.Factory(lambda self: supported_by(self.backend), takes_self=True),
        converter=frozenset,
        validator=_node_types,
        repr=lambda types: f"frozenset({{{', '.join(sorted(t.__name__ for t in types))}}})",
    )

    @property
    def limits(self) -> BackendLimits:
        """What the backend declares it cannot do (`nnterp.limits`)."""
        return limits_for(self.backend)

    @classmethod
    def from_model(cls, model: Any) -> "ModelSpec":
        """Snapshot a loaded `StandardizedTransformer` (or anything with its attributes).

        Reads ``num_layers``, ``hidden_size``, ``num_heads``, ``vocab_size``, ``backend``,
        and, when present, ``attention_probs_enabled`` and the engine's limits:
        ``max_model_len``, ``served_sites`` and ``vector_rows``.

        Raises:
            TypeError: ``model`` lacks one of those attributes.
        """
        missing = [
            name
            for name in ("num_layers", "hidden_size", "num_heads", "vocab_size", "backend")
            if not hasattr(model, name)
        ]
        if missing:
            raise TypeError(
                f"expected a StandardizedTransformer, got {type(model).__name__} without "
                f"{', '.join(missing)}; pass a loaded model, a model name, or a ModelSpec"
            )
        probs = getattr(model, "attention_probs_enabled", False)
        return cls(
            num_layers=int(model.num_layers),
            hidden_size=int(model.hidden_size),
            num_heads=int(model.num_heads),
            vocab_size=int(model.vocab_size),
            backend=model.backend,
            attention_probs_enabled=bool(probs),
            max_model_len=getattr(model, "max_model_len", None),
            served_sites=getattr(model, "served_sites", None),
            vector_rows=getattr(model, "vector_rows", None),
        )

    @classmethod
    def from_config(
        cls, config: Any, backend: str = "hf", attention_probs_enabled: bool = False
    ) -> "ModelSpec":
        """Build a spec from a transformers configuration (or its ``config.json`` dict).

        Understands the common spellings (``num_hidden_layers``/``n_layer``,
        ``hidden_size``/``n_embd``/``d_model``, ``num_attention_heads``/``n_head``) and
        multimodal configurations that nest the language model's in ``text_config``.

        Raises:
            ValueError: a size is missing; the message names the spellings tried.
        """
        return cls(
            num_layers=_config_int(
                config, ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
            ),
            hidden_size=_config_int(config, ("hidden_size", "n_embd", "d_model")),
            num_heads=_config_int(config, ("num_attention_heads", "n_head", "num_heads")),
            vocab_size=_config_int(config, ("vocab_size",)),
            backend=backend,
            attention_probs_enabled=attention_probs_enabled,
        )

    def describe(self) -> str:
        """A short description for messages: ``hf model (30 layers, hidden_size 576)``."""
        return f"{self.backend} model ({self.num_layers} layers, hidden_size {self.hidden_size})"


def _lookup(config: Any, name: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(name)
    return getattr(config, name, None)


def _config_int(config: Any, names: tuple[str, ...]) -> int:
    # The language model's sizes: in text_config when there is one (gemma3, llava,
    # ...: the top level describes the whole multimodal model), else on the config.
    for scope in (_lookup(config, "text_config"), config):
        if scope is None:
            continue
        for name in names:
            value = _lookup(scope, name)
            if type(value) is int:
                return value
    raise ValueError(
        f"the model configuration ({type(config).__name__}) has none of "
        f"{', '.join(names)} (also looked in text_config); it may not be a causal "
        "language model nnterp supports"
    )


class DescribedModel:
    """A model the DSL runs on that is known by its `ModelSpec`, tokenizer and identity
    rather than loaded in this process: several engines seen as one
    (`nnterp.parallel.DataParallel`), a server's engine (`nnterp.serve.engine_model`).
    It reads as a loaded model does where the DSL looks (sizes, engine limits,
    ``identity()``, ``execute``); a subclass runs plans with ``execute_many``."""

    _SPEC_FIELDS = ("num_layers", "hidden_size", "num_heads", "vocab_size", "backend", "attention_probs_enabled",
                    "max_model_len", "served_sites", "vector_rows")

    def __init__(self, spec: ModelSpec, tokenizer: Any, identity: dict) -> None:
        self.spec, self.tokenizer, self._identity = spec, tokenizer, identity

    def __getattr__(self, name: str) -> Any:
        if name in DescribedModel._SPEC_FIELDS:
            return getattr(self.spec, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def identity(self) -> dict:
        return dict(self._identity)

    def execute(self, plan: Any, prompts: Any, sampling: Any) -> Any:
        return self.execute_many([(plan, prompts, sampling)])[0]

    def execute_many(self, jobs: Any) -> list[Any]:
        raise NotImplementedError
