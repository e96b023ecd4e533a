"""`RunResult`: a run's named outputs, generated tokens and manifest, and their files.

``result.save(dir)`` writes two files a colleague can read without nnterp's internals:
``manifest.json`` (what ran: graph document, prompts, sampling, model identity,
backend, versions; plus the layout of the outputs) and ``tensors.safetensors`` (every
output tensor and the generated token ids, under flat keys such as ``lens.0`` or
``layers[5].output.2.1``). `RunResult.load` reads both back into the same structure.

Outputs are tensors, tuples of tensors (``Lens`` with ``top_k``) or lists of either
(one entry per prompt or per step); the manifest's ``layout`` records which, so loading
rebuilds exactly what ``run`` returned.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch

__all__ = ["RunResult", "flatten_outputs", "rebuild_outputs", "atomic_write", "pack_result", "unpack_result",
           "result_to_bytes", "result_from_bytes"]

_MANIFEST = "manifest.json"
_TENSORS = "tensors.safetensors"


def _flatten(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Put every tensor of ``value`` into ``tensors``; return the layout that rebuilds it."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return key
    if isinstance(value, tuple):
        return {"tuple": [_flatten(item, f"{key}.{i}", tensors) for i, item in enumerate(value)]}
    if isinstance(value, list):
        return {"list": [_flatten(item, f"{key}.{i}", tensors) for i, item in enumerate(value)]}
    raise TypeError(f"cannot save an output of type {type(value).__name__} at {key!r}")


def _rebuild(layout: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(layout, str):
        return tensors[layout]
    if "tuple" in layout:
        return tuple(_rebuild(item, tensors) for item in layout["tuple"])
    return [_rebuild(item, tensors) for item in layout["list"]]


def flatten_outputs(outputs: dict[str, Any], prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Every tensor of ``outputs`` into ``tensors`` under ``prefix.<name>...``; the layout
    (name -> structure of keys) that `rebuild_outputs` turns back into the outputs."""
    return {name: _flatten(value, f"{prefix}.{name}", tensors) for name, value in outputs.items()}


def rebuild_outputs(layout: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {name: _rebuild(item, tensors) for name, item in layout.items()}


class RunResult:
    """The named outputs of a run, with the generated tokens and a manifest.

    ``result[name]`` gives an output (see SPEC.md for shapes); ``result.tokens`` and
    ``result.texts`` the generated token ids and texts per prompt; ``result.manifest``
    what is needed to reproduce the run (`nnterp.dsl.replay` runs it again).
    """

    def __init__(self, outputs: dict[str, Any], tokens: list[list[int]], texts: list[str],
                 manifest: dict[str, Any]) -> None:
        self._outputs = outputs
        self.tokens = tokens
        self.texts = texts
        self.manifest = manifest

    def __getitem__(self, name: str) -> Any:
        try:
            return self._outputs[name]
        except KeyError:
            raise KeyError(f"this run has no output {name!r}; outputs: {', '.join(self._outputs) or 'none'}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._outputs

    def keys(self) -> list[str]:
        return list(self._outputs)

    def __repr__(self) -> str:
        return f"RunResult(outputs={self.keys()}, prompts={len(self.tokens)}, backend={self.manifest['backend']!r})"

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``manifest.json`` and ``tensors.safetensors`` into ``directory``.

        Each file is written to a temporary name and renamed into place, so an
        interrupted save never leaves a manifest that points at missing tensors.

        Returns:
            The directory.
        """
        from safetensors.torch import save_file

        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        layout = flatten_outputs(self._outputs, "out", tensors)
        for i, row in enumerate(self.tokens):
            tensors[f"tokens.{i}"] = torch.tensor(row, dtype=torch.int64)
        document = dict(self.manifest, layout=layout, texts=self.texts)
        atomic_write(os.path.join(directory, _TENSORS), lambda path: save_file(tensors, path))
        text = json.dumps(document, indent=2, sort_keys=True) + "\n"
        atomic_write(os.path.join(directory, _MANIFEST), lambda path: _write_text(path, text))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "RunResult":
        """Read a result written by `save`."""
        from safetensors.torch import load_file

        directory = os.fspath(directory)
        with open(os.path.join(directory, _MANIFEST)) as handle:
            document = json.load(handle)
        tensors = load_file(os.path.join(directory, _TENSORS))
        layout = document.pop("layout")
        texts = document.pop("texts")
        outputs = rebuild_outputs(layout, tensors)
        tokens = [tensors[f"tokens.{i}"].tolist() for i in range(len(document["prompts"]))]
        return cls(outputs, tokens, texts, document)


def pack_result(result: RunResult, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``result``'s outputs and generated tokens into ``tensors``, under ``prefix``
    (``{prefix}out.<name>...``, ``{prefix}tokens`` with ``{prefix}tokens.offsets``): one
    tensor for every row's tokens, not one per row. Returns the outputs' layout."""
    layout = flatten_outputs({name: result[name] for name in result.keys()}, f"{prefix}out", tensors)
    lengths = torch.tensor([len(row) for row in result.tokens], dtype=torch.int64)
    tensors[f"{prefix}tokens"] = torch.tensor([t for row in result.tokens for t in row], dtype=torch.int64)
    tensors[f"{prefix}tokens.offsets"] = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return layout


def unpack_result(tensors: dict[str, torch.Tensor], prefix: str, layout: dict[str, Any], texts: list[str],
                  manifest: dict[str, Any]) -> RunResult:
    """The `RunResult` that `pack_result` put under ``prefix``."""
    flat, offsets = tensors[f"{prefix}tokens"].tolist(), tensors[f"{prefix}tokens.offsets"].tolist()
    tokens = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    return RunResult(rebuild_outputs(layout, tensors), tokens, list(texts), manifest)


def result_to_bytes(result: RunResult) -> bytes:
    """A `RunResult` as one safetensors document (what a server sends back): the outputs
    and tokens as tensors, the layout, texts and manifest in its metadata."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    meta = {"layout": pack_result(result, "", tensors), "texts": result.texts, "manifest": result.manifest}
    return save(tensors, metadata={"nnterp_result": "1", "meta": json.dumps(meta)})


def result_from_bytes(data: bytes) -> RunResult:
    """The `RunResult` that `result_to_bytes` wrote.

    Raises:
        ValueError: ``data`` is not such a document.
    """
    from safetensors.torch import load

    try:
        tensors = load(data)
        # the header: 8 bytes of its length (little-endian), then JSON with the metadata
        size = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(data[8:8 + size])["__metadata__"]["meta"])
    except Exception as err:
        raise ValueError(f"not an nnterp result document ({type(err).__name__}: {err})") from None
    return unpack_result(tensors, "", meta["layout"], meta["texts"], meta["manifest"])


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


def atomic_write(path: str, write) -> None:
    """Call ``write(temporary)`` and rename the temporary file to ``path``: a reader never
    sees a half-written file, and a failed write leaves nothing behind."""
    folder = os.path.dirname(path) or "."
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
