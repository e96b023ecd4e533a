"""What a run recorded, keyed by `OutputKey`, stored the way the executor produced it.

Executors that run one prompt at a time (HF, nnsight's vLLM executor) record one value
per key, and `KeyedValues` holds them as they are. The batch-wide vLLM executor records
every prompt's rows of one op at once, as a few large tensors; `BlockValues` keeps them
so. A sweep of 8,192 prompts over 22 layers is 180,000 keys: building a tensor view and
a dict entry for each costs more than the engine's forward passes, so `BlockValues`
gives the run's assembly whole stacks (`Recorded.stacked`) and builds keyed views only
if something asks for a single key.

Both are read-only mappings, so a run's assembly never needs to know which executor ran.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterator, Sequence

import attrs
import numpy as np
import torch

from nnterp.dsl.plan import OutputKey

__all__ = ["Execution", "join_recorded", "Recorded", "KeyedValues", "Block", "BlockValues", "Recorder", "as_recorded", "block_order"]


class Recorded(Mapping):
    """Recorded values by `OutputKey` (a CPU tensor, or a ``(probs, ids)`` pair)."""

    def stacked(self, name: str, layer: int | None, step: int, n_prompts: int) -> Any | None:
        """Every prompt's value at ``step`` as one tensor ``[n_prompts, ...]`` (a pair of
        them for a lens with ``top_k``), when the store holds them that way; else None
        (the caller then reads key by key)."""
        return None

    def before_end(self, generated: Sequence[int]) -> "Recorded":
        """Only the values of steps each prompt reached: ``step < generated[prompt]``."""
        raise NotImplementedError

    def prompt_range(self, start: int, stop: int) -> "Recorded":
        """The values of prompts ``start .. stop - 1``, numbered from 0: one job's share
        of a run that batched the prompts of several jobs with the same plan."""
        raise NotImplementedError


class KeyedValues(Recorded):
    """A plain dict of recorded values."""

    def __init__(self, values: Mapping[OutputKey, Any]) -> None:
        self._values = dict(values)

    def __getitem__(self, key: OutputKey) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[OutputKey]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def before_end(self, generated: Sequence[int]) -> "KeyedValues":
        kept = {key: value for key, value in self._values.items() if key.step < generated[key.prompt]}
        return self if len(kept) == len(self._values) else KeyedValues(kept)

    def prompt_range(self, start: int, stop: int) -> "KeyedValues":
        return KeyedValues({attrs.evolve(key, prompt=key.prompt - start): value
                            for key, value in self._values.items() if start <= key.prompt < stop})


def as_recorded(values: Mapping[OutputKey, Any]) -> Recorded:
    """``values`` as a `Recorded` store (a plain mapping becomes `KeyedValues`)."""
    return values if isinstance(values, Recorded) else KeyedValues(values)


def _check_meta(meta: Any) -> np.ndarray:
    meta = np.asarray(meta, dtype=np.int64)
    if meta.ndim != 2 or meta.shape[1] != 3:
        raise ValueError(f"a block's meta must be [rows, 3] (prompt, step, order), got shape {meta.shape}")
    return meta


def block_order(meta: np.ndarray) -> np.ndarray | None:
    """The permutation that sorts rows recorded in ``meta`` order into a `Block`'s order,
    ``(prompt, step, order)``; None when they already are (as rows recorded step by
    step in prompt order mostly are)."""
    order = np.lexsort((meta[:, 2], meta[:, 1], meta[:, 0]))
    return None if np.all(order[1:] > order[:-1]) else order


@attrs.frozen(eq=False)
class Block:
    """Every row one op recorded, sorted by ``(prompt, step, order)``.

    Args:
        name: the output's name.
        layer: the lens layer, or None.
        single: whether the op reads one position (an int), so that each
            ``(prompt, step)`` holds one row, which is the value itself; otherwise a
            value is the ``[rows, ...]`` slice of its ``(prompt, step)``.
        meta: ``[rows, 3]`` int64: prompt, step and order (the index in the op's list of
            positions, or the position itself for ``positions=None``) of each row.
        data: ``[rows, ...]`` tensor, or a tuple of them (a lens's probabilities and ids).
    """

    name: str
    layer: int | None
    single: bool
    meta: np.ndarray = attrs.field(converter=_check_meta)
    data: Any

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.data if isinstance(self.data, tuple) else (self.data,)

    def take(self, rows: Any) -> Any:
        """The data of ``rows`` (a slice or an index array), in the block's own form."""
        if not isinstance(rows, slice):
            rows = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        picked = tuple(t[rows] for t in self.tensors)
        return picked if isinstance(self.data, tuple) else picked[0]

    def where(self, keep: np.ndarray) -> "Block":
        """The rows where ``keep`` holds."""
        if keep.all():
            return self
        return Block(self.name, self.layer, self.single, self.meta[keep], self.take(np.flatnonzero(keep)))


class BlockValues(Recorded):
    """Recorded values as `Block`s, one per op, and any values recorded one key at a time
    (``keyed``: attention probabilities, gradients)."""

    def __init__(self, blocks: Sequence[Block], keyed: Mapping[OutputKey, Any] | None = None) -> None:
        self._blocks = {(block.name, block.layer): block for block in blocks}
        if len(self._blocks) != len(blocks):
            raise ValueError("two blocks record the same output and layer")
        self._extra = dict(keyed or {})
        self._keyed: dict[OutputKey, Any] | None = None

    # -- whole stacks ----------------------------------------------------------------------

    def stacked(self, name: str, layer: int | None, step: int, n_prompts: int) -> Any | None:
        block = self._blocks.get((name, layer))
        if block is None or n_prompts == 0:
            return None
        meta = block.meta
        at = meta[:, 1] == step
        count = int(at.sum())
        per, rest = divmod(count, n_prompts)
        if per == 0 or rest or (block.single and per != 1):
            return None
        rows: Any = slice(None) if count == len(meta) else np.flatnonzero(at)
        prompt, order = meta[rows, 0], meta[rows, 2]
        if not np.array_equal(prompt, np.repeat(np.arange(n_prompts), per)):
            return None
        if not block.single and not np.array_equal(order, np.tile(np.arange(per), n_prompts)):
            return None  # not one row per listed position (e.g. positions=None)
        picked = block.take(rows)
        if block.single:
            return picked
        shape = lambda t: t.reshape(n_prompts, per, *t.shape[1:])  # noqa: E731
        return tuple(shape(t) for t in picked) if isinstance(picked, tuple) else shape(picked)

    def before_end(self, generated: Sequence[int]) -> "BlockValues":
        reached = np.asarray(generated, dtype=np.int64)
        blocks = [block.where(block.meta[:, 1] < reached[block.meta[:, 0]]) for block in self._blocks.values()]
        extra = {key: value for key, value in self._extra.items() if key.step < reached[key.prompt]}
        if all(new is old for new, old in zip(blocks, self._blocks.values())) and len(extra) == len(self._extra):
            return self
        return BlockValues(blocks, extra)

    def prompt_range(self, start: int, stop: int) -> "BlockValues":
        blocks = []
        for block in self._blocks.values():
            kept = block.where((block.meta[:, 0] >= start) & (block.meta[:, 0] < stop))
            meta = kept.meta.copy()
            meta[:, 0] -= start
            blocks.append(Block(kept.name, kept.layer, kept.single, meta, kept.data))
        extra = {attrs.evolve(key, prompt=key.prompt - start): value
                 for key, value in self._extra.items() if start <= key.prompt < stop}
        return BlockValues(blocks, extra)

    # -- one key at a time ---------------------------------------------------------------

    def _by_key(self) -> dict[OutputKey, Any]:
        if self._keyed is None:
            self._keyed = dict(self._extra)
            for block in self._blocks.values():
                self._keyed.update(_split_block(block))
        return self._keyed

    def __getitem__(self, key: OutputKey) -> Any:
        return self._by_key()[key]

    def __iter__(self) -> Iterator[OutputKey]:
        return iter(self._by_key())

    def __len__(self) -> int:
        return len(self._by_key())


def _split_block(block: Block) -> dict[OutputKey, Any]:
    """One view per ``(prompt, step)`` of a block."""
    values: dict[OutputKey, Any] = {}
    keys = block.meta[:, :2]
    if not len(keys):
        return values
    starts = np.flatnonzero(np.r_[True, np.any(keys[1:] != keys[:-1], axis=1)])
    counts = np.diff(np.r_[starts, len(keys)]).tolist()
    pieces = [torch.split(t, counts) for t in block.tensors]
    for g, start in enumerate(starts.tolist()):
        parts = [p[g][0] if block.single else p[g] for p in pieces]
        key = OutputKey(block.name, step=int(keys[start, 1]), prompt=int(keys[start, 0]), layer=block.layer)
        values[key] = tuple(parts) if isinstance(block.data, tuple) else parts[0]
    return values


class Recorder:
    """Collects a run's values as an executor produces them: each op's rows a batch at a
    time (`add_rows`), or one value per key (``recorder[key] = value``).

    An executor that runs all prompts as one batch (the HF backend) records a read of a
    thousand prompts with one call instead of a thousand dict entries; `recorded` then
    joins each op's batches into one sorted `Block`.
    """

    def __init__(self) -> None:
        self._chunks: dict[tuple[str, int | None], list[tuple[np.ndarray, Any]]] = {}
        self._single: dict[tuple[str, int | None], bool] = {}
        self._keyed: dict[OutputKey, Any] = {}

    def __setitem__(self, key: OutputKey, value: Any) -> None:
        self._keyed[key] = value

    def add_rows(self, name: str, layer: int | None, step: int, prompts: Sequence[int], data: Any,
                 single: bool) -> None:
        """Record ``data`` for ``prompts`` at ``step``: ``[prompts, ...]`` when the op reads
        one position (``single``), else ``[prompts, rows each, ...]`` (its listed
        positions, or a prompt's every token). ``data`` may be a tuple of such tensors."""
        tensors = data if isinstance(data, tuple) else (data,)
        n = len(prompts)
        per = 1 if single else int(tensors[0].shape[1])
        meta = np.empty((n * per, 3), dtype=np.int64)
        meta[:, 0] = np.repeat(np.asarray(prompts, dtype=np.int64), per)
        meta[:, 1] = step
        meta[:, 2] = np.tile(np.arange(per), n)
        if not single:
            tensors = tuple(t.reshape(n * per, *t.shape[2:]) for t in tensors)
        key = (name, layer)
        if self._single.setdefault(key, single) != single:
            raise ValueError(f"output {name!r}: rows recorded both as single values and as lists")
        self._chunks.setdefault(key, []).append((meta, tensors if isinstance(data, tuple) else tensors[0]))

    def recorded(self) -> BlockValues:
        """Everything recorded (read it once the values' copies have landed)."""
        blocks = []
        for (name, layer), chunks in self._chunks.items():
            meta = np.concatenate([m for m, _ in chunks])
            pair = isinstance(chunks[0][1], tuple)
            fields = [torch.cat([c[1][i] if pair else c[1] for c in chunks]) for i in range(2 if pair else 1)]
            order = block_order(meta)
            if order is not None:
                index = torch.from_numpy(order)
                meta, fields = meta[order], [f[index] for f in fields]
            blocks.append(Block(name, layer, self._single[(name, layer)], meta,
                                tuple(fields) if pair else fields[0]))
        return BlockValues(blocks, self._keyed)


def join_recorded(parts: Sequence[tuple[int, Recorded]]) -> Recorded:
    """One store of the values of several parts of a run, each ``(its first prompt's row
    in the run, its values)`` numbered from 0 within the part: the inverse of
    `Recorded.prompt_range`. Blocks stay blocks; anything else is joined key by key."""
    if all(isinstance(values, BlockValues) for _, values in parts):
        by_output: dict[tuple[str, int | None], list[tuple[int, Block]]] = {}
        extra: dict[OutputKey, Any] = {}
        for offset, values in parts:
            for key, block in values._blocks.items():
                by_output.setdefault(key, []).append((offset, block))
            extra.update({attrs.evolve(k, prompt=k.prompt + offset): v for k, v in values._extra.items()})
        blocks = []
        for (name, layer), pieces in by_output.items():
            meta = np.concatenate([block.meta + np.array([offset, 0, 0]) for offset, block in pieces])
            first = pieces[0][1]
            fields = [torch.cat([block.tensors[i] for _, block in pieces]) for i in range(len(first.tensors))]
            order = block_order(meta)
            if order is not None:
                index = torch.from_numpy(order)
                meta, fields = meta[order], [f[index] for f in fields]
            blocks.append(Block(name, layer, first.single, meta,
                                tuple(fields) if isinstance(first.data, tuple) else fields[0]))
        return BlockValues(blocks, extra)
    return KeyedValues({attrs.evolve(key, prompt=key.prompt + offset): value
                        for offset, values in parts for key, value in values.items()})


@attrs.frozen
class Execution:
    """What a backend returns for a plan: recorded values and generated tokens.

    Args:
        values: every recorded value, keyed by `OutputKey`: a CPU tensor, or a
            ``(probs, token_ids)`` pair for a lens with ``top_k``. A plain mapping
            becomes `nnterp.dsl.recorded.KeyedValues`; a batch-wide executor passes
            `nnterp.dsl.recorded.BlockValues`, which keeps whole stacks.
        tokens: the token ids generated for each prompt, in prompt order.
        executor: which executor ran the plan (recorded in the run manifest).
        stats: what the executor counted, for profiles and tests (e.g. the engine's
            steps, chunked prompts and preemptions during the run).
    """

    values: Mapping[OutputKey, Any] = attrs.field(converter=lambda values: as_recorded(values))
    tokens: tuple[tuple[int, ...], ...] = attrs.field(converter=lambda rows: tuple(tuple(map(int, r)) for r in rows))
    executor: str
    stats: Mapping[str, int] = attrs.field(factory=dict, kw_only=True)
