"""The contract between the DSL and the backends: a `Plan` in, an `Execution` out
(`nnterp.dsl.recorded.Execution`, beside the recorded values it holds).

A graph says *what* to do; lowering (`nnterp.dsl.lowering`) turns it into a `Plan`,
which says *where in the forward pass and in which order*: a flat listing of typed
operations, each at a resolved site, sorted in model order (nnsight serves activations
in that order) with graph order kept at one site. A backend runs a plan with
``Backend.execute(plan, prompts, sampling)`` and returns an `Execution`: every value it
recorded, keyed by `OutputKey` (output name, generation step, prompt, lens layer), and
the tokens generated for each prompt. ``run`` turns that into the shapes SPEC.md gives.

Everything here is plain frozen data, like a jaxpr: one class per kind of operation,
no behaviour beyond small queries, and a ``repr`` that reads like a listing. It knows
nothing of backends, nnsight or vLLM, and it travels to vLLM's workers by pickle, so
it stays importable and small.

This module imports attrs, the DSL's sites, steps and values only.
"""

from __future__ import annotations

import hashlib

import enum
from typing import Any, Callable, Iterator, Sequence, Union

import attrs

from nnterp.dsl.sites import Site
from nnterp.dsl.steps import Positions, Steps, acts_at, is_multi_step
from nnterp.dsl.values import TensorValue

__all__ = [
    "Prompts",
    "Sampling",
    "Steps",
    "Positions",
    "ReadOp",
    "LensOp",
    "ZeroOp",
    "PatchOp",
    "SteerOp",
    "AttentionProbsOp",
    "GradCaptureOp",
    "GradOp",
    "Op",
    "OutputKind",
    "Output",
    "OutputKey",
    "Plan",
]



# -- prompts -----------------------------------------------------------------------------


@attrs.frozen(eq=False, repr=False)
class Prompts(Sequence[str]):
    """A run's prompts, with their token ids as the model's tokenizer gives them.

    ``run`` tokenizes a sweep once, in one batch call, and validation (the position
    checks) and the executors (HF's padded batch, vLLM's requests) share the ids: for
    thousands of short prompts a tokenization costs about as much as a forward pass of
    them on a GPU. It is a sequence of the texts, so code that wants only the texts
    takes it as it takes a list of strings.

    Example:
        >>> prompts = Prompts(("The capital of France is", "Hi"), ((504, 3575, 282, 4649, 314), (26843,)))
        >>> len(prompts), prompts[1], prompts.token_ids[1]
        (2, 'Hi', (26843,))
    """

    texts: tuple[str, ...] = attrs.field(converter=tuple)
    token_ids: tuple[tuple[int, ...], ...] = attrs.field(converter=lambda rows: tuple(tuple(r) for r in rows))
    #: the run's row of the first prompt: a part of a run split across engines
    #: (`nnterp.parallel`) samples its rows with the run's seeds (`Sampling.request_seed`)
    first: int = attrs.field(default=0, kw_only=True)

    def __attrs_post_init__(self) -> None:
        if len(self.texts) != len(self.token_ids):
            raise ValueError(f"Prompts: {len(self.texts)} texts but {len(self.token_ids)} rows of token ids")

    @classmethod
    def tokenize(cls, texts: Sequence[str], tokenizer: Callable[..., Any]) -> "Prompts":
        """``texts`` tokenized by ``tokenizer`` (special tokens included, as a model
        is fed), in one batch call."""
        texts = list(texts)
        return cls(texts, tokenizer(texts)["input_ids"] if texts else [])

    @classmethod
    def of(cls, prompts: Sequence[str], tokenizer: Callable[..., Any]) -> "Prompts":
        """``prompts`` as they are if already tokenized, else tokenized by ``tokenizer``."""
        return prompts if isinstance(prompts, cls) else cls.tokenize(prompts, tokenizer)

    def __getitem__(self, index: Any) -> Any:
        return self.texts[index]

    def part(self, start: int, stop: int) -> "Prompts":
        """Prompts ``start .. stop - 1``, which keep their rows in the run (``first``)."""
        return Prompts(self.texts[start:stop], self.token_ids[start:stop], first=self.first + start)

    def __len__(self) -> int:
        return len(self.texts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.texts)

    def __repr__(self) -> str:
        return f"Prompts({len(self)} prompts)"


# -- sampling ----------------------------------------------------------------------------


def _non_negative(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"Sampling.{attribute.name} must be >= 0, got {value!r}")


def _top_p(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"Sampling.top_p must be in (0, 1], got {value!r}")


def _max_tokens(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Sampling.max_tokens must be an int >= 1, got {value!r}")


@attrs.frozen
class Sampling:
    """How a run samples: the vLLM ``SamplingParams`` subset both backends honour.

    ``max_tokens=1`` is the prompt's forward pass and one sampled token; larger values
    generate, and nodes with ``steps`` other than 0 act or read in those later passes.
    ``temperature=0`` is greedy.

    ``seed`` makes the whole run reproducible: the same graph, prompts and sampling give
    the same tokens again, on the same backend. It seeds the run, not each prompt, so
    copies of a prompt still sample differently (as many samples as copies). vLLM draws
    each request from its own seed, `request_seed`; HF seeds torch once for the batch.
    The two backends' samples differ from each other.

    Example:
        >>> Sampling(max_tokens=10)
        Sampling(max_tokens=10, temperature=0.0, top_p=1.0, seed=None)
        >>> Sampling(seed=0).request_seed(0) != Sampling(seed=0).request_seed(1)
        True
    """

    max_tokens: int = attrs.field(default=1, validator=_max_tokens)
    temperature: float = attrs.field(default=0.0, converter=float, validator=_non_negative)
    top_p: float = attrs.field(default=1.0, converter=float, validator=_top_p)
    seed: int | None = None

    def request_seed(self, row: int) -> int | None:
        """The seed of the run's request for ``prompts[row]`` (None without a run seed):
        a stable function of the run's seed and the row, the same in every process."""
        if self.seed is None:
            return None
        digest = hashlib.sha256(f"nnterp-seed:{self.seed}:{row}".encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1


# -- operations --------------------------------------------------------------------------


def _show_positions(positions: Positions) -> str:
    return "all" if positions is None else repr(positions)


@attrs.frozen
class _Op:
    """Fields every operation has: where it acts, when, and which node it came from."""

    site: Site
    node_index: int = attrs.field(kw_only=True)

    #: the forward passes this op acts in (fixed per class, or a field)
    steps: Steps = attrs.field(default=0, kw_only=True)

    def acts_at(self, step: int) -> bool:
        """Whether this op acts in the forward pass of generation step ``step``."""
        return acts_at(self.steps, step)

    def _details(self) -> str:
        return ""

    def __repr__(self) -> str:
        verb = _VERBS[type(self)]
        steps = "" if self.steps == 0 else f" steps={self.steps}"
        details = self._details()
        return f"{str(self.site):<22} {verb:<15}{details}{steps}   # nodes[{self.node_index}]"


@attrs.frozen(repr=False)
class ReadOp(_Op):
    """Record the activation at ``site`` (at ``positions``) under ``name``."""

    positions: Positions = attrs.field(default=-1, kw_only=True)
    name: str = attrs.field(kw_only=True)

    def _details(self) -> str:
        return f"positions={_show_positions(self.positions)} -> {self.name!r}"


@attrs.frozen(repr=False)
class LensOp(_Op):
    """Project ``layers[layer].output`` (at ``positions``) through the final norm and
    the unembedding, and record the probabilities (or the ``top_k`` of them)."""

    layer: int = attrs.field(kw_only=True)
    positions: Positions = attrs.field(default=-1, kw_only=True)
    top_k: int | None = attrs.field(default=None, kw_only=True)
    name: str = attrs.field(kw_only=True)

    def _details(self) -> str:
        top = "" if self.top_k is None else f" top_k={self.top_k}"
        return f"positions={_show_positions(self.positions)}{top} -> {self.name!r}"


@attrs.frozen(repr=False)
class ZeroOp(_Op):
    """Set the activation at ``site`` to zero at ``positions``."""

    positions: Positions = attrs.field(default=None, kw_only=True)

    def _details(self) -> str:
        return f"positions={_show_positions(self.positions)}"


@attrs.frozen(repr=False)
class PatchOp(_Op):
    """Replace the activation at ``site`` with ``value`` at ``positions``."""

    value: TensorValue = attrs.field(kw_only=True)
    positions: Positions = attrs.field(default=-1, kw_only=True)

    def _details(self) -> str:
        return f"value={self.value!r} positions={_show_positions(self.positions)}"


@attrs.frozen(repr=False)
class SteerOp(_Op):
    """Add ``scale * vector`` to the activation at ``site`` (at ``positions``)."""

    vector: TensorValue = attrs.field(kw_only=True)
    scale: float = attrs.field(default=1.0, kw_only=True)
    positions: Positions = attrs.field(default=None, kw_only=True)

    def _details(self) -> str:
        return f"{self.scale:g} * {self.vector!r} positions={_show_positions(self.positions)}"


@attrs.frozen(repr=False)
class AttentionProbsOp(_Op):
    """Record the attention probabilities of ``site.layer`` (the site is the layer's
    ``attentions[i].output``, where they are computed) under ``name``."""

    name: str = attrs.field(kw_only=True)

    def _details(self) -> str:
        return f"-> {self.name!r}"


@attrs.frozen(repr=False)
class GradCaptureOp(_Op):
    """Keep the activation at ``site`` so that a later `GradOp` can take its gradient."""

    name: str = attrs.field(kw_only=True)

    def _details(self) -> str:
        return f"for {self.name!r}"


@attrs.frozen(repr=False)
class GradOp(_Op):
    """Once the logits exist: the gradient of log p(``target``) at the last position with
    respect to the activation its `GradCaptureOp` kept, at ``positions``."""

    target: int = attrs.field(kw_only=True)
    positions: Positions = attrs.field(default=-1, kw_only=True)
    name: str = attrs.field(kw_only=True)

    def _details(self) -> str:
        return (f"d log p(token {self.target}) / d {self.name!r} "
                f"positions={_show_positions(self.positions)}")


Op = Union[ReadOp, LensOp, ZeroOp, PatchOp, SteerOp, AttentionProbsOp, GradCaptureOp, GradOp]

_VERBS: dict[type, str] = {
    ReadOp: "read", LensOp: "lens", ZeroOp: "zero", PatchOp: "patch", SteerOp: "steer",
    AttentionProbsOp: "attention_probs", GradCaptureOp: "grad_capture", GradOp: "grad",
}


# -- outputs -----------------------------------------------------------------------------


class OutputKind(enum.Enum):
    """What kind of value a named output holds, which decides its shape in the result."""

    READ = "read"
    LENS = "lens"
    ATTENTION_PROBS = "attention_probs"
    GRAD = "grad"


@attrs.frozen
class Output:
    """A named output of the plan and what ``run`` needs to shape it.

    Args:
        name: the key in ``run(...)[name]``.
        kind: what the values are.
        positions: the positions read (None: every token, so rows differ in length).
        steps: the steps read (a tuple or ``"all"`` adds a step axis).
        top_k: a lens's top-k (its values are ``(probs, token_ids)`` pairs).
        layers: a lens's layers, in the order its result stacks them.
    """

    name: str
    kind: OutputKind
    positions: Positions = -1
    steps: Steps = 0
    top_k: int | None = None
    layers: tuple[int, ...] = ()

    @property
    def multi_step(self) -> bool:
        return is_multi_step(self.steps)


@attrs.frozen(order=True)
class OutputKey:
    """Where one recorded value belongs: output name, step, prompt index, lens layer.

    Example:
        >>> OutputKey("lens", step=0, prompt=2, layer=5)
        OutputKey('lens', step=0, prompt=2, layer=5)
    """

    name: str
    step: int = attrs.field(kw_only=True)
    prompt: int = attrs.field(kw_only=True)
    layer: int | None = attrs.field(default=None, kw_only=True)

    def __repr__(self) -> str:
        layer = "" if self.layer is None else f", layer={self.layer}"
        return f"OutputKey({self.name!r}, step={self.step}, prompt={self.prompt}{layer})"


# -- the plan ----------------------------------------------------------------------------


@attrs.frozen(repr=False)
class Plan:
    """A lowered graph: operations in execution order, and the facts executors need.

    Args:
        ops: every operation, sorted by site order, graph order kept at one site.
        num_layers: the model's layer count.
        max_step: the last generation step any operation needs (0: the prompt pass only).
        outputs: the named outputs, in graph order.

    Example:
        >>> from nnterp.dsl import Graph, Lens, ModelSpec, Read, Steer
        >>> from nnterp.dsl.lowering import lower
        >>> spec = ModelSpec(num_layers=2, hidden_size=4, num_heads=1, vocab_size=10)
        >>> graph = Lens(top_k=1) >> Steer(0, [1.0] * 4, scale=2) >> Read("logits")
        >>> print(lower(graph, spec, max_tokens=3))
        Plan: 2 layers, steps 0..2, outputs 'lens', 'logits'
          layers[0].output       lens           positions=-1 top_k=1 -> 'lens'   # nodes[0]
          layers[0].output       steer          2 * TensorValue(float32[4]) positions=all steps=all   # nodes[1]
          layers[1].output       lens           positions=-1 top_k=1 -> 'lens'   # nodes[0]
          logits                 read           positions=-1 -> 'logits'   # nodes[2]
    """

    ops: tuple[Op, ...]
    num_layers: int
    max_step: int
    outputs: tuple[Output, ...]

    def ops_at(self, step: int) -> tuple[Op, ...]:
        """The operations acting in the forward pass of generation step ``step``."""
        return tuple(op for op in self.ops if op.acts_at(step))

    @property
    def needs_grad(self) -> bool:
        """Whether the forward pass must keep an autograd graph (a `GradOp` is present)."""
        return any(isinstance(op, GradOp) for op in self.ops)

    def sites(self) -> tuple[Site, ...]:
        """Every site an operation touches, once each, in execution order."""
        return tuple(dict.fromkeys(op.site for op in self.ops))

    def __repr__(self) -> str:
        steps = "0" if self.max_step == 0 else f"0..{self.max_step}"
        names = ", ".join(repr(output.name) for output in self.outputs) or "none"
        lines = [f"Plan: {self.num_layers} layers, steps {steps}, outputs {names}"]
        lines += [f"  {op!r}" for op in self.ops]
        return "\n".join(lines)
