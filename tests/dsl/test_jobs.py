"""Jobs, their grouping and their waves: plain data, no model."""

from __future__ import annotations

import pytest

from nnterp.dsl import Job, Read, Sampling, Steer
from nnterp.dsl.jobs import as_job, group_jobs, waves


def test_jobs_with_the_same_graph_and_sampling_form_one_group_with_their_prompts_end_to_end():
    a, b = Read("layers[0].output"), Steer(0, [1.0, 0.0])
    jobs = [Job(a, ["p0", "p1"]), Job(b, ["q0"]), Job(Read("layers[0].output"), ["p2"]),
            Job(a, ["p3"], Sampling(max_tokens=2))]
    groups = group_jobs(jobs)
    assert [g.members for g in groups] == [(0, 2), (1,), (3,)]
    first = groups[0]
    assert first.prompts == ("p0", "p1", "p2")
    assert first.share(0) == (0, 2) and first.share(1) == (2, 3)


def test_a_seeded_sampling_job_is_a_group_of_its_own():
    seeded = Sampling(max_tokens=2, temperature=1.0, seed=0)
    jobs = [Job(Read("logits"), ["a"], seeded), Job(Read("logits"), ["b"], seeded),
            Job(Read("logits"), ["c"], Sampling(seed=0)), Job(Read("logits"), ["d"], Sampling(seed=0))]
    assert [g.members for g in group_jobs(jobs)] == [(0,), (1,), (2, 3)]  # greedy: the seed is moot


def test_waves_fit_the_capacity_in_order():
    assert waves([1] * 5, need=lambda n: n, capacity=None) == [[1] * 5]
    assert waves([2, 2, 2, 5, 1], need=lambda n: n, capacity=4) == [[2, 2], [2], [5], [1]]
    assert waves([0, 0, 3], need=lambda n: n, capacity=3) == [[0, 0, 3]]
    assert waves([], need=lambda n: n, capacity=3) == []


def test_as_job_takes_pairs_and_triples_and_names_a_bad_one():
    job = as_job((Read("logits"), "one prompt"), 0)
    assert job.prompts == ("one prompt",) and job.sampling == Sampling()
    assert as_job((Read("logits"), ["a"], None), 0).sampling == Sampling()
    with pytest.raises(TypeError, match=r"jobs\[4\]: sampling must be a Sampling"):
        as_job((Read("logits"), ["a"], {"max_tokens": 2}), 4)
    with pytest.raises(ValueError, match=r"jobs\[2\] needs at least one prompt"):
        as_job((Read("logits"), []), 2)
