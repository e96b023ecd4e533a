"""Jobs: what ``run_batch`` takes, and how a batch of them reaches the backend.

A `Job` is a graph, its prompts and its sampling: one graph per prompt, contrastive pairs
and per-prompt steering vectors are all lists of jobs. ``run_batch`` validates every job
before anything runs, then hands the backend *groups*: jobs with the same graph and the
same sampling run as one plan over their prompts put end to end (HF in padded batches
of its ``batch_tokens``; vLLM installs one plan), and are split back afterwards. Different groups go to
the backend together (`Backend.execute_many`), in *waves* that fit the engine's table
of edit vectors, which the plans installed at once share.

This module is plain data and arithmetic: it runs nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import attrs

from nnterp.dsl.graph import Graph, as_graph
from nnterp.dsl.nodes import Node
from nnterp.dsl.plan import Sampling
from nnterp.dsl.sources import iter_prompts

__all__ = ["Job", "JobGroup", "as_prompts", "as_job", "group_jobs", "waves"]


def as_prompts(prompts: Any, where: str = "run") -> tuple[str, ...]:
    """``prompts`` (a string, an iterable of them, a dataset column or a file: see
    `nnterp.dsl.sources`) as a tuple of non-empty strings, read whole.

    Raises:
        ValueError: no prompt.
        TypeError: a prompt that is not a non-empty string; the message names it.
    """
    prompts = tuple(iter_prompts(prompts, where))
    if not prompts:
        raise ValueError(f"{where} needs at least one prompt")
    return prompts


@attrs.frozen
class Job:
    """One graph on its prompts, with its sampling: what ``run`` does in one call.

    Example:
        >>> from nnterp.dsl import Lens
        >>> job = Job(Lens(top_k=3), ["The capital of France is"])
        >>> len(job.graph), job.prompts, job.sampling.max_tokens
        (1, ('The capital of France is',), 1)
    """

    graph: Graph = attrs.field(converter=as_graph)
    prompts: tuple[str, ...] = attrs.field(converter=as_prompts)
    sampling: Sampling = attrs.field(factory=Sampling)


def as_job(item: Any, index: int) -> Job:
    """A `Job`, or a ``(graph, prompts)`` / ``(graph, prompts, sampling)`` tuple, as a
    `Job`; anything else is refused with a message that names ``jobs[index]``."""
    if isinstance(item, Job):
        return item
    where = f"run_batch: jobs[{index}]"
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
        raise TypeError(f"{where} must be (graph, prompts) or (graph, prompts, sampling), "
                        f"got {type(item).__name__}")
    graph, prompts = item[0], item[1]
    sampling = item[2] if len(item) == 3 and item[2] is not None else Sampling()
    if not isinstance(graph, (Graph, Node)):
        raise TypeError(f"{where}: the graph must be a Graph or a node, got {type(graph).__name__}")
    if not isinstance(sampling, Sampling):
        raise TypeError(f"{where}: sampling must be a Sampling, got {type(sampling).__name__}")
    return Job(graph, as_prompts(prompts, where), sampling)


@attrs.frozen
class JobGroup:
    """Jobs that run as one plan: the same graph and sampling, their prompts end to end.

    Args:
        members: the jobs' indices in the batch, in order.
        offsets: where each member's prompts start in the group's prompts.
        prompts: every member's prompts, in order.
    """

    members: tuple[int, ...]
    offsets: tuple[int, ...]
    prompts: tuple[str, ...]

    def share(self, member: int) -> tuple[int, int]:
        """``(start, stop)`` of the ``member``-th job's prompts in the group's."""
        start = self.offsets[member]
        stop = self.offsets[member + 1] if member + 1 < len(self.offsets) else len(self.prompts)
        return start, stop


def group_jobs(jobs: Sequence[Job]) -> list[JobGroup]:
    """The jobs grouped by (graph, sampling), in order of each group's first job. Graphs
    are compared by digest (their canonical JSON), so equal graphs built apart group.
    A job that samples with a seed (``temperature > 0``) is a group of its own."""
    members: dict[tuple, list[int]] = {}
    for index, job in enumerate(jobs):
        # a seeded sample depends on the request's row (`Sampling.request_seed`), and on
        # HF on the whole batch: such a job runs alone, so it samples what it would alone
        alone = index if job.sampling.seed is not None and job.sampling.temperature > 0 else None
        members.setdefault((job.graph.digest(), job.sampling, alone), []).append(index)
    groups = []
    for indices in members.values():
        offsets, prompts = [], []
        for index in indices:
            offsets.append(len(prompts))
            prompts.extend(jobs[index].prompts)
        groups.append(JobGroup(tuple(indices), tuple(offsets), tuple(prompts)))
    return groups


def waves(items: Sequence[Any], need: Callable[[Any], int], capacity: int | None) -> list[list[Any]]:
    """``items`` in order, cut into runs whose ``need`` sums to at most ``capacity`` (all
    in one when ``capacity`` is None). An item that alone needs more goes alone:
    validation has already refused a graph that cannot fit.

    Example:
        >>> waves([3, 3, 3, 1], need=lambda n: n, capacity=6)
        [[3, 3], [3, 1]]
    """
    if capacity is None:
        return [list(items)] if items else []
    out: list[list[Any]] = []
    used = 0
    for item in items:
        n = need(item)
        if out and used + n <= capacity:
            out[-1].append(item)
            used += n
        else:
            out.append([item])
            used = n
    return out
