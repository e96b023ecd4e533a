"""Streamed runs: results go to disk a shard at a time, and a killed run resumes.

``run(..., out=DIR)`` and ``run_batch(..., out=DIR)`` read their input a chunk at a
time (``shard_prompts`` prompts), run each chunk as an ordinary in-memory call, and
write its results as one shard (`nnterp.dsl.stored`). Memory holds the chunk being run,
the one being written and the prompts of the one being read, whatever the input's
length: reader and writer are threads of their own, so the model waits for neither the
input nor the disk.

Resuming: a directory whose index already names shards was written by an earlier run.
This run must be the same (its `identity`: graphs, sampling, model configuration and
weights, backend, shard size), and its input must start with the same prompts, shard
by shard (each shard records its prompts' digest): then it skips what is done and goes
on from the first missing shard. Anything else is refused, naming what differs, before
anything runs. A shard is renamed into place and only then named by the index, so a
run killed at any moment leaves nothing half-written that the next run would trust.

This module runs nothing itself: ``run`` hands it a function that runs one chunk.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import re
import time
from typing import Any, Callable, Iterator, Sequence

import attrs

from nnterp.dsl.results import RunResult
from nnterp.dsl.stored import (KIND_JOBS, ResultsError, prompts_digest, read_index, shard_name, write_index,
                               write_shard)

__all__ = ["DEFAULT_SHARD_PROMPTS", "Stream", "stream"]

#: prompts per shard by default: 8,192 prompts of a 4-layer last-token collect at 1.1B
#: (bfloat16) is 128 MiB a shard
DEFAULT_SHARD_PROMPTS = 8192


@attrs.frozen
class Stream:
    """What a streamed run writes, and what a resumed one must match.

    Args:
        directory: where the results go.
        kind: `nnterp.dsl.stored.KIND_GRAPHS` or `KIND_JOBS`.
        identity: what a resumed run must match (JSON-able).
        shard_prompts: prompts per shard (jobs: a shard closes once its jobs hold as many).
        progress: show a progress bar.
        total: prompts in the input, where known (the bar's ETA).
    """

    directory: str
    kind: str
    identity: dict
    shard_prompts: int
    progress: bool = True
    total: int | None = None


#: what each identity key is, as a message names it
_IDENTITY = {"graphs": "graphs (digests)", "single": "number of graphs", "sampling": "sampling",
             "model": "model (configuration and weights digests)", "backend": "backend",
             "shard_prompts": "shard size (shard_prompts)"}


def _check_identity(directory: str, recorded: dict, current: dict) -> None:
    for key in sorted(set(recorded) | set(current)):
        if recorded.get(key) != current.get(key):
            old, new = recorded.get(key), current.get(key)
            raise ResultsError(
                f"{directory} holds the results of another run: its {_IDENTITY.get(key, key)} "
                f"{'were' if key == 'graphs' else 'was'} {_short(old)}, this run's {_short(new)}; pass another "
                "out= directory, or delete this one to start over")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _skip_done(directory: str, shards: list[dict], items: Iterator[Any], digest_of: Callable[[list[Any]], str],
               sizes: Callable[[dict], int]) -> None:
    """Consume the input that the index's shards already hold, checking each shard's
    input against it."""
    first = 0
    for number, shard in enumerate(shards):
        taken = list(itertools.islice(items, sizes(shard)))
        if len(taken) < sizes(shard) or digest_of(taken) != shard["digest"]:
            what = "jobs (graphs, sampling or prompts)" if "jobs" in shard else "prompts"
            raise ResultsError(
                f"{directory} holds results for other {what}: shard {number} (prompts {first} .. "
                f"{first + shard['prompts'] - 1}) was written for {what} this run's input does not start with; "
                f"pass the same input to resume, another out= directory, or delete this one to start over")
        first += shard["prompts"]


_SHARD = re.compile(r"^shard-(\d{5,})\.safetensors$")


def _remove_strays(directory: str, done: int) -> None:
    """Shards past the index's (written, but killed before the index named them) and
    temporary files of a killed write. Only names this module writes are touched."""
    for name in os.listdir(directory):
        match = _SHARD.match(name)
        if (match and int(match.group(1)) >= done) or name.startswith(".tmp-"):
            os.remove(os.path.join(directory, name))


def _check_files(directory: str, shards: list[dict]) -> None:
    missing = [shard["file"] for shard in shards if not os.path.exists(os.path.join(directory, shard["file"]))]
    if missing:
        raise ResultsError(f"{directory}: the index names {len(missing)} shard(s) that are not there "
                           f"({', '.join(missing[:3])}); restore them, or delete the directory to start over")


def stream(plan: Stream, items: Iterator[Any], run_chunk: Callable[[list[Any], int, Any], list[RunResult]],
           prompts_of: Callable[[Any], Sequence[str]], manifest_of: Callable[[list[RunResult]], dict],
           digest_of: Callable[[list[Any]], str] | None = None,
           prepare: Callable[[list[Any]], Any] | None = None) -> None:
    """Run ``items`` chunk by chunk into ``plan.directory``, resuming what is there.

    Three things overlap: the next chunk is read (and ``prepare``d) on a thread of its
    own while the model runs the current one, and the previous one is written on
    another. The model waits neither for the input (a generator, a file, a dataset)
    nor for the disk.

    Args:
        items: the input: prompts (graphs kind) or jobs (jobs kind), read lazily.
        run_chunk: ``(chunk, index of its first item, what prepare gave) -> results``:
            one result per graph (graphs kind) or per job (jobs kind).
        prompts_of: an item's prompts (a prompt itself, or a job's).
        manifest_of: the index's manifest, from the first chunk's results.
        digest_of: a chunk's digest, which a resumed run's input must reproduce (default:
            the digest of its prompts; jobs add their graphs and sampling).
        prepare: work on a chunk that needs no model (tokenizing it), done on the
            reading thread; None: nothing.
    """
    if digest_of is None:
        digest_of = lambda chunk: prompts_digest([p for item in chunk for p in prompts_of(item)])  # noqa: E731
    from tqdm.auto import tqdm

    directory = plan.directory
    os.makedirs(directory, exist_ok=True)
    index = read_index(directory)
    if index is not None:
        if index.get("kind") != plan.kind:
            raise ResultsError(f"{directory} holds results of a run of {index.get('kind')}, not of {plan.kind}; "
                               "pass another out= directory, or delete this one to start over")
        _check_identity(directory, index["identity"], plan.identity)
    else:
        index = {"nnterp_results": 1, "kind": plan.kind, "identity": plan.identity, "manifest": None,
                 "shards": [], "prompts": 0, "complete": False}
    jobs = plan.kind == KIND_JOBS
    count = (lambda shard: shard["jobs"]) if jobs else (lambda shard: shard["prompts"])
    _check_files(directory, index["shards"])
    _skip_done(directory, index["shards"], items, digest_of, count)
    if index.get("complete"):
        if next(items, None) is not None:
            raise ResultsError(f"{directory} holds the complete results of a run whose input ended after "
                               f"{index['prompts']} prompts; this run's input is longer. Pass another out= "
                               "directory, or delete this one to start over")
        return
    _remove_strays(directory, len(index["shards"]))
    items_done = sum(count(shard) for shard in index["shards"])
    bar = tqdm(total=plan.total, initial=index["prompts"], unit="prompt", desc="nnterp run",
               disable=not plan.progress, dynamic_ncols=True)
    started, tokens = time.perf_counter(), 0
    writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="nnterp-shards")
    reader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="nnterp-input")
    pending: concurrent.futures.Future | None = None

    def read_chunk() -> tuple[list[Any], Any]:
        # only this thread reads ``items`` from here on, one chunk at a time
        chunk = _next_chunk(items, plan.shard_prompts, prompts_of)
        return chunk, (prepare(chunk) if prepare is not None and chunk else None)

    def commit(number: int, results: list[RunResult], entry: dict) -> None:
        write_shard(os.path.join(directory, shard_name(number)), results, manifests=jobs)
        if index["manifest"] is None:
            index["manifest"] = manifest_of(results)
        index["shards"].append(entry)
        index["prompts"] += entry["prompts"]
        # the input so far, as one digest: a chain of the shards' digests
        index["digest"] = prompts_digest([index.get("digest", ""), entry["digest"]])
        write_index(directory, index)

    try:
        upcoming = reader.submit(read_chunk)
        while True:
            # a bad item (a prompt that is not a string) fails here, after the chunks
            # before it are written: a run resumed once it is fixed keeps them
            chunk, prepared = upcoming.result()
            if not chunk:
                break
            upcoming = reader.submit(read_chunk)  # read while this chunk runs
            results = run_chunk(chunk, items_done, prepared)
            prompts = [p for item in chunk for p in prompts_of(item)]
            if pending is not None:
                pending.result()  # the previous shard is written: at most two chunks in memory
            entry = {"file": shard_name(len(index["shards"])), "prompts": len(prompts), "first": index["prompts"],
                     "digest": digest_of(chunk)}
            if jobs:
                entry["jobs"] = len(chunk)
            pending = writer.submit(commit, len(index["shards"]), results, entry)
            items_done += len(chunk)
            tokens += sum(r.manifest.get("prompt_tokens", 0) + sum(map(len, r.tokens)) for r in results)
            bar.update(len(prompts))
            bar.set_postfix_str(f"{tokens / max(time.perf_counter() - started, 1e-9):,.0f} tok/s")
        if pending is not None:
            pending.result()
        if not index["shards"]:
            raise ValueError("run needs at least one prompt; the input is empty")
        index["complete"] = True
        write_index(directory, index)
    finally:
        writer.shutdown(wait=True)
        # a read in flight finishes (the input's own iterator cannot be interrupted);
        # its chunk is dropped, and a resumed run reads it again
        reader.shutdown(wait=True, cancel_futures=True)
        bar.close()


def _next_chunk(items: Iterator[Any], shard_prompts: int, prompts_of: Callable[[Any], Sequence[str]]) -> list[Any]:
    """The next items, up to ``shard_prompts`` prompts (at least one item)."""
    chunk, prompts = [], 0
    for item in items:
        chunk.append(item)
        prompts += len(prompts_of(item))
        if prompts >= shard_prompts:
            break
    return chunk
