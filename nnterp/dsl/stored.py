"""Results on disk: sharded safetensors files and their index, read back lazily.

A streamed run (``run(..., out=DIR)``) writes one *shard* per chunk of its input, each a
safetensors file that a colleague can read without nnterp, and an ``index.json`` that
says what the shards are and what produced them:

* ``index.json``: ``{"nnterp_results": 1, "kind", "identity", "manifest", "shards":
  [{"file", "prompts", "first", "digest"}], "prompts", "digest", "complete"}``: a shard's
  digest is that of its input (`prompts_digest`; for jobs, their graphs and sampling
  too), and the index's ``digest`` chains them: one digest of the whole input. ``identity``
  is what a resumed run must match (graph digests, sampling, model and weights digests,
  backend, shard size); ``manifest`` is a run manifest (`RunResult.manifest`) without
  its prompts.
* ``shard-00000.safetensors``: for each *part* ``p`` of the shard (a graph of a sweep,
  or a job of ``run_batch``), its outputs under ``p/out.<name>...`` (the flat keys of
  `RunResult.save`), its generated tokens as ``p/tokens`` with ``p/tokens.offsets``,
  and in the file's metadata the outputs' layout, the prompts and the texts.

Every file is written to a temporary name and renamed into place, and the index names
a shard only once its file is whole: a run killed at any moment leaves a directory
whose index describes only complete shards.

`open_results` reads a directory back: a `StoredResult` per graph, whose outputs are
the shards' outputs put end to end, with the keys and shapes of a `RunResult`; or, for
the jobs of ``run_batch``, a sequence of `RunResult`, one per job, each read from its
shard when asked for. Tensors are read from the files when an output is asked for,
and `StoredResult.shards` and `StoredResult.batches` go through a dataset larger than
memory one shard at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any, Iterator

import torch

from nnterp.dsl.results import RunResult, atomic_write, pack_result, unpack_result
from nnterp.errors import ResultsError

__all__ = ["INDEX", "KIND_GRAPHS", "KIND_JOBS", "ResultsError", "prompts_digest", "shard_name",
           "write_shard", "read_index", "write_index", "open_results", "StoredResult", "StoredJobs"]

INDEX = "index.json"
#: the index's parts are graphs, each run on every prompt of the input
KIND_GRAPHS = "graphs"
#: the index's parts are jobs of ``run_batch``, each whole in one shard
KIND_JOBS = "jobs"
_FORMAT = 1


def prompts_digest(prompts: Sequence[str]) -> str:
    """sha256 of the prompts, in order (each ends with a NUL, so ``["ab"]`` and
    ``["a", "b"]`` differ)."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(prompt.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def write_shard(path: str, parts: Sequence[RunResult], manifests: bool = False) -> None:
    """One shard: every part's outputs, tokens, texts and prompts, in one file; with
    ``manifests``, each part's manifest too (the jobs of ``run_batch``, each its own)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    meta: list[dict] = []
    for p, result in enumerate(parts):
        layout = pack_result(result, f"{p}/", tensors)
        meta.append({"layout": layout, "texts": result.texts, "prompts": result.manifest["prompts"]})
        if manifests:
            meta[-1]["manifest"] = {k: v for k, v in result.manifest.items() if k != "prompts"}
    atomic_write(path, lambda temporary: save_file(tensors, temporary, metadata={
        "nnterp_shard": str(_FORMAT), "parts": json.dumps(meta)}))


def read_index(directory: str) -> dict | None:
    """The directory's index, or None when it has none."""
    path = os.path.join(directory, INDEX)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as handle:
            index = json.load(handle)
    except (OSError, ValueError) as err:
        raise ResultsError(f"{path}: not a readable results index ({err})") from None
    if not isinstance(index, dict) or index.get("nnterp_results") != _FORMAT:
        raise ResultsError(f"{path}: not an nnterp results index of format {_FORMAT}")
    return index


def write_index(directory: str, index: dict) -> None:
    text = json.dumps(index, indent=1, sort_keys=True) + "\n"

    def write(path: str) -> None:
        with open(path, "w") as handle:
            handle.write(text)

    atomic_write(os.path.join(directory, INDEX), write)


# -- reading ---------------------------------------------------------------------------


class _Shard:
    """One shard file, opened lazily: its parts' layouts and texts from the metadata,
    tensors read when asked for."""

    def __init__(self, path: str) -> None:
        from safetensors import safe_open

        self.path = path
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
        except Exception as err:
            raise ResultsError(f"{path}: cannot read the shard ({type(err).__name__}: {err})") from None
        self.parts = json.loads(metadata.get("parts", "[]"))

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)}

    def result(self, part: int, manifest: dict) -> RunResult:
        meta = self.parts[part]
        manifest = dict(meta.get("manifest", manifest), prompts=list(meta["prompts"]))
        return unpack_result(self.tensors(f"{part}/"), f"{part}/", meta["layout"], meta["texts"], manifest)


def _joined(values: list[Any]) -> Any:
    """One output's per-shard values end to end: stacks concatenated on the prompt axis,
    per-prompt lists concatenated, pairs joined element by element."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(values)
    if isinstance(first, tuple):
        return tuple(_joined([v[i] for v in values]) for i in range(len(first)))
    return [item for value in values for item in value]


class StoredResult:
    """One graph's results in a results directory, with the keys and shapes of the
    `RunResult` that ``run`` would have returned for every prompt at once.

    ``result[name]`` reads that output from every shard (the whole output in memory);
    `shards` yields one `RunResult` per shard and `batches` one batch of rows at a
    time, for datasets larger than memory.
    """

    def __init__(self, directory: str, index: dict, part: int) -> None:
        self.directory, self._index, self._part = directory, index, part
        self.manifest = dict(index["manifest"])
        if index["kind"] == KIND_GRAPHS and "graphs" in self.manifest:
            self.manifest["graph"] = self.manifest.pop("graphs")[part]
            self.manifest["graph_digest"] = index["identity"]["graphs"][part]
        self._files = [os.path.join(directory, shard["file"]) for shard in index["shards"]]

    @property
    def complete(self) -> bool:
        """Whether the run that wrote the directory finished (else: the shards so far)."""
        return bool(self._index.get("complete"))

    def __len__(self) -> int:
        return int(self._index["prompts"])

    def shards(self) -> Iterator[RunResult]:
        """Each shard's part of the results, in order, one in memory at a time."""
        for path in self._files:
            yield _Shard(path).result(self._part, self.manifest)

    def keys(self) -> list[str]:
        if not self._files:
            return []
        return list(_Shard(self._files[0]).parts[self._part]["layout"])

    def __contains__(self, name: str) -> bool:
        return name in self.keys()

    def __getitem__(self, name: str) -> Any:
        if name not in self.keys():
            raise KeyError(f"these results have no output {name!r}; outputs: {', '.join(self.keys()) or 'none'}")
        return _joined([shard[name] for shard in self.shards()])

    @property
    def tokens(self) -> list[list[int]]:
        return [row for shard in self.shards() for row in shard.tokens]

    @property
    def texts(self) -> list[str]:
        return [text for path in self._files for text in _Shard(path).parts[self._part]["texts"]]

    @property
    def prompts(self) -> list[str]:
        return [prompt for path in self._files for prompt in _Shard(path).parts[self._part]["prompts"]]

    def batches(self, name: str, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[torch.Tensor]:
        """Rows of one stacked output (``[prompts, ...]``: a read of one position, a lens)
        in batches of ``batch_size``, one shard in memory at a time: with ``shuffle``, the
        shards in a random order and the rows of each shuffled (the last batch of a
        shard may be short). The loader of an SAE trained on collected activations."""
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self._files), generator=generator).tolist() if shuffle else range(len(self._files))
        for i in order:
            value = _Shard(self._files[i]).result(self._part, self.manifest)[name]
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"batches({name!r}): the output is not one tensor per shard "
                                f"(a list per prompt, or a top-k pair); read it with shards()")
            rows = torch.randperm(len(value), generator=generator) if shuffle else torch.arange(len(value))
            for start in range(0, len(rows), batch_size):
                yield value[rows[start:start + batch_size]]

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return f"StoredResult({self.directory!r}, prompts={len(self)}, shards={len(self._files)}, {state})"


class StoredJobs(Sequence):
    """The jobs of a ``run_batch(..., out=DIR)``: ``jobs[i]`` is job ``i``'s `RunResult`,
    read from its shard when asked for."""

    def __init__(self, directory: str, index: dict) -> None:
        self.directory, self._index = directory, index
        self._where: list[tuple[str, int]] = []
        for shard in index["shards"]:
            self._where += [(os.path.join(directory, shard["file"]), part) for part in range(shard["jobs"])]

    @property
    def complete(self) -> bool:
        return bool(self._index.get("complete"))

    def __len__(self) -> int:
        return len(self._where)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        path, part = self._where[index]
        return _Shard(path).result(part, {})

    def __repr__(self) -> str:
        return f"StoredJobs({self.directory!r}, jobs={len(self)})"


def open_results(directory: str | os.PathLike) -> Any:
    """The results a streamed run wrote into ``directory``, read lazily.

    Returns:
        A `StoredResult` for ``run(graph, ..., out=DIR)``; a list of them, one per
        graph, for ``run([g1, g2, ...], ..., out=DIR)``; a `StoredJobs` sequence of
        `RunResult` for ``run_batch(jobs, ..., out=DIR)``.

    Raises:
        ResultsError: the directory holds no results index, or an unreadable one.
    """
    directory = os.fspath(directory)
    index = read_index(directory)
    if index is None:
        raise ResultsError(f"{directory}: no {INDEX}; not a directory written by run(..., out=...)")
    if index["kind"] == KIND_JOBS:
        return StoredJobs(directory, index)
    graphs = len(index["identity"]["graphs"])
    if index["identity"].get("single"):
        return StoredResult(directory, index, 0)
    return [StoredResult(directory, index, part) for part in range(graphs)]
