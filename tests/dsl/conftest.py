"""Fixtures for the DSL tests: a hand-written ModelSpec and hypothesis strategies.

The strategies are handed out by session fixtures (use them with ``st.data()``), so
every test file draws nodes and graphs from the same definitions without importing
one test module from another.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st

from nnterp.dsl import (
    AttentionProbs,
    Grad,
    Graph,
    Lens,
    ModelSpec,
    Patch,
    Read,
    Source,
    Steer,
    TensorValue,
    Zero,
)

LAYERED = ("layers[{}].output", "layers[{}].input", "attentions[{}].output", "mlps[{}].output")


@pytest.fixture(scope="session")
def spec() -> ModelSpec:
    """A small HF model: 4 layers, hidden 8, vocab 100, attention probabilities on."""
    return ModelSpec(
        num_layers=4, hidden_size=8, num_heads=2, vocab_size=100, attention_probs_enabled=True
    )


layers = st.integers(-4, 3)
sites = st.one_of(
    st.builds(lambda form, i: form.format(i), st.sampled_from(LAYERED), layers),
    st.sampled_from(["embeddings.output", "logits"]),
)
int_lists = st.lists(st.integers(-50, 50), min_size=1, max_size=4)
positions = st.one_of(st.none(), st.integers(-50, 50), int_lists, int_lists.map(tuple))
steps = st.one_of(
    st.integers(0, 20),
    st.lists(st.integers(0, 20), min_size=1, max_size=3),
    st.sampled_from(["all", all]),
)
names = st.one_of(st.none(), st.text(min_size=1, max_size=12))
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
float_dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64])


@st.composite
def tensors(draw, min_dims: int = 1, max_dims: int = 3, last: int | None = None):
    """A floating-point TensorValue with arbitrary bits (NaN, inf and -0.0 included)."""
    ndim = draw(st.integers(min_dims, max_dims))
    shape = [draw(st.integers(0, 3)) for _ in range(ndim)]
    if last is not None and ndim:
        shape[-1] = last
    dtype = draw(float_dtypes)
    count = 1
    for d in shape:
        count *= d
    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw = draw(st.binary(min_size=count * itemsize, max_size=count * itemsize))
    if not raw:
        return TensorValue.from_tensor(torch.empty(shape, dtype=dtype))
    tensor = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
    return TensorValue.from_tensor(tensor)


sources = st.builds(
    Source,
    st.text(min_size=1, max_size=20),
    site=st.one_of(st.none(), sites),
    position=st.integers(-10, 10),
)

nodes = st.one_of(
    st.builds(Read, sites, positions=positions, steps=steps, name=names),
    st.builds(Zero, sites, positions=positions),
    st.builds(Patch, sites, value=tensors(), positions=positions),
    st.builds(Patch, sites, source=sources, positions=positions),
    st.builds(
        Steer,
        st.integers(-10, 10),
        tensors(min_dims=1, max_dims=1),
        scale=st.one_of(finite, st.integers(-(10**6), 10**6)),
        positions=positions,
    ),
    st.builds(
        Lens,
        layers=st.one_of(
            st.sampled_from(["all", all]),
            st.integers(-5, 5),
            int_lists,
            st.builds(range, st.integers(1, 4)),
        ),
        positions=positions,
        steps=steps,
        top_k=st.one_of(st.none(), st.integers(1, 1000)),
        name=st.text(min_size=1, max_size=12),
    ),
    st.builds(
        Grad,
        sites,
        st.one_of(st.integers(0, 10**6), st.text(max_size=10)),
        positions=positions,
        name=names,
    ),
    st.builds(AttentionProbs, st.integers(-10, 10), name=names),
)
graphs = st.lists(nodes, max_size=6).map(Graph)


@pytest.fixture(scope="session")
def node_strategy():
    return nodes


@pytest.fixture(scope="session")
def graph_strategy():
    return graphs
