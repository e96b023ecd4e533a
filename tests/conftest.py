"""Shared fixtures: tiny models of every family, the bundled model, loaded once per session."""

from __future__ import annotations

import concurrent.futures
import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

import tiny_models  # noqa: E402
from backend_settings import TEST_DTYPE, engine_kwargs, in_process  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Property tests take their example counts from the active profile. CI runs the same
# examples on every run (derandomized, so a red build is not a roll of the dice), without
# a time limit per example (shared runners are slow), and prints the blob that replays a
# failure with @reproduce_failure. At a desk the examples are random, so repeated runs
# explore further. HYPOTHESIS_PROFILE picks one by name. Both start from hypothesis's
# defaults, not from whichever profile hypothesis itself loaded on seeing CI set.
_DEFAULTS = settings.get_profile("default")
settings.register_profile("ci", _DEFAULTS, derandomize=True, database=None, deadline=None, max_examples=100,
                          print_blob=True)
settings.register_profile("dev", _DEFAULTS, max_examples=100)
_ON_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if _ON_CI else "dev"))


@pytest.fixture(scope="session")
def bundled_path() -> Path:
    import nnterp

    return nnterp.bundled_model_path()


@pytest.fixture(scope="session")
def tokenizer_path(request) -> Path:
    """The tokenizer of the tiny models: the bundled model's, or the folder named by
    ``NNTERP_TEST_TOKENIZER`` (a GPU host given only the tokenizer files)."""
    given = os.environ.get("NNTERP_TEST_TOKENIZER")
    return Path(given) if given else request.getfixturevalue("bundled_path")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer_path):
    """``tiny_dir(family)`` -> folder of a random-weight model of that family."""
    root = tmp_path_factory.mktemp("tiny")

    def make(family: str) -> Path:
        return tiny_models.build(family, root / family, tokenizer_path)

    return make


@pytest.fixture(scope="session")
def hf_models(tiny_dir):
    """``hf_models(family, **kwargs)`` -> a StandardizedTransformer, cached per arguments."""
    from nnterp import StandardizedTransformer

    cache = {}

    def load(family: str, **kwargs):
        if TEST_DTYPE != "float32":
            import torch

            kwargs.setdefault("dtype", getattr(torch, TEST_DTYPE))
        key = (family, tuple(sorted(kwargs.items(), key=str)))
        if key not in cache:
            path = "bundled" if family == "bundled" else tiny_dir(family)
            cache[key] = StandardizedTransformer(path, backend="hf", **kwargs)
        return cache[key]

    return load


@pytest.fixture(scope="session")
def vllm_models(tiny_dir):
    """``vllm_models(family)`` -> a StandardizedTransformer on vLLM, one engine per family
    for the whole session, in this process on a CPU host (`backend_settings.in_process`)."""
    pytest.importorskip("vllm")
    from nnterp import StandardizedTransformer

    cache = {}

    def load(family: str, folder=None, **kwargs):
        """``folder``: a model of that family built by the test; ``kwargs``: engine
        settings beyond the suite's (each combination is its own engine)."""
        key = (family, str(folder), tuple(sorted(kwargs.items(), key=str)))
        if key not in cache:
            path = folder or ("bundled" if family == "bundled" else tiny_dir(family))
            settings = {**engine_kwargs(tiny=family != "bundled"), **kwargs}
            # In-process engines share the process's distributed state, and closing one
            # tears it down for the others: they all stay up until the session ends.
            with in_process():
                cache[key] = StandardizedTransformer(path, backend="vllm", **settings)
        return cache[key]

    yield load
    import torch

    if not torch.cuda.is_available():
        # in-process engines stop at once, but one after the other: each tears down the
        # process's distributed state, which two at a time would tear down twice. Every
        # engine is closed even if one fails; the first failure is raised after.
        failures = []
        for model in cache.values():
            try:
                model.close()
            except Exception as error:  # noqa: BLE001 - re-raised below
                failures.append(error)
        if failures:
            raise failures[0]
        return
    # An engine takes ~5 s to stop, mostly waiting for its processes to exit: stop them
    # all at once rather than one after the other.
    with concurrent.futures.ThreadPoolExecutor(max(1, len(cache))) as pool:
        for stopped in [pool.submit(model.close) for model in cache.values()]:
            stopped.result()
