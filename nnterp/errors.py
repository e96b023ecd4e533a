"""Every public nnterp exception, in one place.

Each class subclasses `NnterpError` and the builtin it refines, so callers can catch
either the nnterp family or the ordinary Python category. This module imports nothing
from nnterp, so any layer may raise these without creating an import cycle.
"""

from __future__ import annotations

__all__ = [
    "NnterpError",
    "ArchitectureNotSupportedError",
    "BackendUnsupportedError",
    "BundledModelError",
    "BackendOptionError",
    "PromptTooLongError",
    "ModelNotFoundError",
    "ValidationError",
    "GraphFormatError",
    "ResultsError",
    "CaptureOverflowError",
    "renamed_argument",
]


class NnterpError(Exception):
    """Base class of every error nnterp raises on purpose."""


class ArchitectureNotSupportedError(NnterpError, ValueError):
    """A model's modules could not be mapped onto the standardized names.

    Raised at load time, not at first use, so a model that cannot be mapped never
    reaches a trace where the failure would surface as an obscure nnsight error.
    The message names every missing or mis-shaped accessor and how to pass a mapping.
    """


class BackendUnsupportedError(NnterpError, NotImplementedError):
    """The chosen backend cannot do what was asked (gradients or attention on vLLM).

    A subclass of `NotImplementedError` because that is what the contract promises;
    a separate class so callers can tell "not on this backend" from a missing feature.
    """


class BundledModelError(NnterpError, RuntimeError):
    """The bundled SmolLM2 model is not installed or could not be converted."""


class PromptTooLongError(NnterpError, ValueError):
    """A prompt has more tokens than the engine or model accepts."""


class ModelNotFoundError(NnterpError, OSError):
    """A model name is neither an existing folder nor a Hugging Face hub id.

    Raised before transformers or vLLM sees the name: for a missing folder they answer
    that a repo id "must be in the form 'repo_name' or 'namespace/repo_name'", which
    does not say that the folder is missing. An `OSError`, as a missing file is.
    """


class BackendOptionError(NnterpError, NotImplementedError, ValueError):
    """A keyword argument the chosen backend does not take (``cuda_graphs`` on HF).

    Both a `NotImplementedError` (the backend cannot do it: what SPEC.md promises for
    vLLM's missing features) and a `ValueError` (a wrong argument for this backend).
    The message says why and what to pass instead, from the backend's limits table.
    """


#: How many problems an error message lists before it says "... and N more"; the
#: exception's ``.problems`` always holds all of them.
_MAX_LISTED = 50


def _numbered(header: str, lines: list[str]) -> str:
    shown = [f"{i}. {line}" for i, line in enumerate(lines[:_MAX_LISTED], start=1)]
    if len(lines) > _MAX_LISTED:
        shown.append(f"... and {len(lines) - _MAX_LISTED} more (see the exception's .problems)")
    return "\n".join([header, *shown])


class ValidationError(NnterpError, ValueError):
    """A DSL graph does not fit the model (or backend) it was checked against.

    Raised by ``nnterp.dsl.validate`` (and so by ``run``) before anything touches the
    model, so a graph that would fail halfway through a forward pass, or silently do
    nothing, is refused up front. It is separate from `GraphFormatError` because the
    graph itself is well formed: the same graph may be valid for another model.

    Attributes:
        problems: every problem found, in graph order: ``nnterp.dsl.Problem`` values
            with ``where``, ``what``, ``fix`` and ``node_index``.
    """

    def __init__(self, problems, header: str | None = None):
        self.problems = tuple(problems)
        self.header = header
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        top = header or f"the graph has {count} {noun}:"
        super().__init__(_numbered(top, [str(p) for p in self.problems]))

    def __reduce__(self):
        return (type(self), (self.problems, self.header))


class GraphFormatError(NnterpError, ValueError):
    """A serialized DSL graph is not a document this nnterp can read.

    Raised by ``nnterp.dsl.from_json`` / ``load`` for malformed, truncated, oversized,
    unknown or newer-version documents; it is the only exception they raise for any
    text, so callers (the command line, a server) can catch exactly this. It is separate
    from `ValidationError` because it is about the document's structure, before any
    model is involved.

    Attributes:
        problems: every structural problem found, as ``(path, message)`` pairs where
            ``path`` is a JSON path such as ``$.graph[1].layer``.
    """

    def __init__(self, problems, header: str | None = None):
        self.problems = [(str(path), str(message)) for path, message in problems]
        self.header = header
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        top = header or f"not a readable nnterp graph document ({count} {noun}):"
        super().__init__(_numbered(top, [f"{path}: {message}" for path, message in self.problems]))

    def __reduce__(self):
        return (type(self), (self.problems, self.header))


def renamed_argument(where: str, old: str, old_value: object, new: str, new_value: object,
                     default: object = None) -> object:
    """The value of an argument that has a new name: the new one's, or the old one's
    with a ``DeprecationWarning`` (for the caller of ``where``) that names the new one.

    Raises:
        TypeError: both names were given.
    """
    if old_value is None:
        return new_value
    if new_value is not None and (default is None or new_value != default):
        raise TypeError(f"{where}: got both {old}= and {new}=; {old}= is the old name of {new}=, pass only {new}=")
    import warnings

    warnings.warn(f"{where}({old}=...) is deprecated; call it {new}=", DeprecationWarning, stacklevel=3)
    return old_value


class ResultsError(NnterpError, ValueError):
    """A results directory (``run(..., out=DIR)``) cannot be read, or cannot be resumed
    by this run: the message says what differs or what is missing, and where.

    A streamed run resumes only the run that wrote the directory (same graphs, sampling,
    model, backend, shard size and input): resuming another would mix two runs' results
    in one dataset without a word.
    """


class CaptureOverflowError(NnterpError, OverflowError):
    """A step of a vLLM run read more rows than the engine's capture buffer holds.

    The run fails with this error and the engine goes on serving: the step's other
    plans (a server's other requests) are not touched. The fix is a larger buffer
    (``capture_bytes=``) or fewer prompts or reads at once.
    """
