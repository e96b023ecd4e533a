"""Starting and stopping vLLM engines: what the client process must take care of.

An engine is a set of processes the client started; it must be stopped once, quietly,
whether the program closes it or forgets it (`opened`, `closed`). Building one also
builds a module tree in the client, which must leave Hugging Face's classes as they were
(`classes_unchanged`), and on CPU its context must fit the default KV cache
(`cpu_max_model_len`).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import weakref
from typing import Any, Iterator, Sequence

__all__ = ["opened", "closed", "hf_model_classes", "classes_unchanged", "cpu_max_model_len"]


def opened(backend: Any) -> None:
    """Note an engine that is up, to be closed at exit if the program does not."""
    _OPEN_ENGINES.add(backend)
    # (re-)registered after vLLM made this engine's finalizers, so that it runs before
    # them: atexit runs the handlers registered last first
    atexit.unregister(_close_at_exit)
    atexit.register(_close_at_exit)


def closed(backend: Any) -> None:
    """Forget an engine the program closed."""
    _OPEN_ENGINES.discard(backend)


def _close_at_exit() -> None:
    """Close, at interpreter exit, every engine the program left open.

    vLLM stops a forgotten engine from its own finalizers, but badly: they signal the
    engine-core process before the client lets go of it (the client then logs that the
    engine "exited unexpectedly"), give the processes vLLM's default 5 s (an engine
    exiting normally on a busy CPU took longer and was force-killed), and log through a
    handler bound to the ``sys.stdout`` of the moment vLLM was imported, which may be
    closed by then (pytest's capture, a redirected stream): each line became "---
    Logging error --- ValueError: I/O operation on closed file". This closes each
    engine the way `VLLMBackend.close` does, after dropping the log handlers whose
    stream is closed (nothing can be written there any more).
    """
    engines = list(_OPEN_ENGINES)
    if not engines:
        return
    for logger in (logging.getLogger("vllm"), logging.getLogger()):
        for handler in list(logger.handlers):
            if getattr(getattr(handler, "stream", None), "closed", False):
                logger.removeHandler(handler)
    for backend in engines:
        backend.close()


#: the engines loaded and not closed yet, weakly held: one that is garbage-collected is
#: stopped by vLLM's own finalizers
_OPEN_ENGINES: "weakref.WeakSet[Any]" = weakref.WeakSet()


def hf_model_classes(name_or_path: str, trust_remote_code: bool) -> list[type]:
    """The Hugging Face class that vLLM's transformers back end would build for this
    model: the base model of its configuration (``GPTNeoXModel``); none if transformers
    maps no base model to it."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    try:
        return [MODEL_MAPPING[type(config)]]
    except KeyError:
        return []


@contextlib.contextmanager
def classes_unchanged(classes: Sequence[type]) -> Iterator[None]:
    """Undo, on leaving, whatever the block did to ``classes``.

    nnsight builds the engine's module tree in this process too (on the meta device), and
    for a family vLLM runs through its generic transformers back end, building it
    decorates Hugging Face's own class in place for torch.compile (new base class,
    ``__init__`` and ``__call__``). Every model of that class in the process would then
    go through vLLM's compiler wrapper: a GPT-NeoX loaded on the HF backend before the
    engine failed with "'GPTNeoXModel' object has no attribute 'do_not_compile'". The
    engine's own processes, which run the model, are not affected by the undo.
    """
    saved = [(cls, cls.__bases__, dict(cls.__dict__)) for cls in classes]
    try:
        yield
    finally:
        for cls, bases, namespace in saved:
            for name in [name for name in cls.__dict__ if name not in namespace]:
                delattr(cls, name)
            for name, value in namespace.items():
                if cls.__dict__.get(name) is not value:
                    setattr(cls, name, value)
            if cls.__bases__ != bases:
                cls.__bases__ = bases


def cpu_max_model_len(name_or_path: str) -> int:
    """The CPU default context: the model's own limit, capped to fit the default KV cache."""
    from transformers import AutoConfig

    from nnterp.backends.vllm_cpu import DEFAULT_MAX_MODEL_LEN

    config = AutoConfig.from_pretrained(name_or_path)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return min(DEFAULT_MAX_MODEL_LEN, limit) if limit else DEFAULT_MAX_MODEL_LEN
