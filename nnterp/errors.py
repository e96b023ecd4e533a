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
    "PromptTooLongError",
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
