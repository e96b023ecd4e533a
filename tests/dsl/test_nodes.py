"""Nodes, sites and tensor values: construction, normalisation, immutability, equality."""

from __future__ import annotations

import math
import pickle

import attrs
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nnterp.dsl import (
    AttentionProbs,
    Grad,
    Lens,
    Patch,
    Read,
    Site,
    Source,
    Steer,
    TensorValue,
    Zero,
)
from nnterp.dsl.values import DTYPES

# -- Site ------------------------------------------------------------------------------

VALID_SITES = [
    ("layers[5].output", ("layers", 5, "output")),
    ("layers[0].input", ("layers", 0, "input")),
    ("attentions[12].output", ("attentions", 12, "output")),
    ("mlps[-1].output", ("mlps", -1, "output")),
    ("embeddings.output", ("embeddings", None, "output")),
    ("logits", ("logits", None, None)),
]


@pytest.mark.parametrize("text, fields", VALID_SITES)
def test_site_parses_to_fields_and_back(text, fields):
    site = Site.parse(text)
    assert (site.module, site.layer, site.side) == fields
    assert str(site) == text
    assert site == Site(*fields)
    assert Site.coerce(site) is site
    assert eval(repr(site)) == site


@pytest.mark.parametrize(
    "text, suggestion",
    [
        ("layer[5].output", "layers[5].output"),
        ("layers_output[5]", "layers[5].output"),
        ("attention[2].output", "attentions[2].output"),
        ("logit", "logits"),
        ("embeddings", "embeddings.output"),
        ("mlp[3].output", "mlps[3].output"),
    ],
)
def test_malformed_site_lists_forms_and_suggests(text, suggestion):
    with pytest.raises(ValueError) as info:
        Site.parse(text)
    message = str(info.value)
    assert repr(text) in message
    assert "'layers[i].output'" in message and "'logits'" in message
    assert f"did you mean {suggestion!r}" in message


@pytest.mark.parametrize(
    "text",
    [
        "mlps[3].input",
        "attentions[0].input",
        "layers[5]",
        "layers[5].output ",
        " logits",
        "layers[05].output",
        "layers[-0].output",
        "layers[+1].output",
        "layers[\u0665].output",  # an Arabic-Indic digit: int() reads it, sites do not
        "layers[1234567890].output",
        "",
        "logits.output",
    ],
)
def test_invalid_site_strings_raise_value_error(text):
    with pytest.raises(ValueError):
        Site.parse(text)


@pytest.mark.parametrize("value", [5, None, b"logits", ["logits"]])
def test_non_string_site_raises_type_error(value):
    with pytest.raises(TypeError, match="valid forms"):
        Site.parse(value)


@pytest.mark.parametrize(
    "fields",
    [("layers", None, "output"), ("layers", True, "output"), ("logits", 1, None), ("mlps", 1, "input"), ("heads", 1, "output")],
)
def test_site_fields_are_checked(fields):
    with pytest.raises((TypeError, ValueError)):
        Site(*fields)


def test_site_resolve_and_properties():
    site = Site.parse("attentions[-2].output")
    assert site.resolve(10) == Site.parse("attentions[8].output")
    assert Site.parse("layers[3].input").resolve(10) == Site.parse("layers[3].input")
    assert Site.parse("logits").resolve(10) == Site.parse("logits")
    with pytest.raises(ValueError, match="out of range"):
        Site.parse("layers[10].output").resolve(10)
    with pytest.raises(ValueError, match="out of range"):
        Site.parse("layers[-11].output").resolve(10)
    assert site.accessor == "attentions_output"
    assert Site.parse("embeddings.output").accessor == "embeddings_output"
    assert Site.parse("logits").accessor == "logits"
    assert Site.parse("logits").width == "vocab_size"
    assert Site.parse("layers[1].input").width == "hidden_size"
    assert site.per_layer and not Site.parse("logits").per_layer


def test_huge_site_string_is_refused_quickly():
    text = "x" * 5_000_000
    with pytest.raises(ValueError) as info:
        Site.parse(text)
    assert len(str(info.value)) < 1000


# -- TensorValue -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [d for d, _ in DTYPES.values()])
def test_tensor_value_round_trips_every_dtype(dtype):
    source = (torch.arange(12) % 3).reshape(3, 4).to(dtype)
    value = TensorValue.from_tensor(source)
    back = value.to_tensor()
    assert back.dtype == dtype and back.shape == source.shape
    assert torch.equal(back, source)


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(3, 5).to(torch.bfloat16),
        torch.tensor(2.5),
        torch.empty(0),
        torch.empty(0, 7, dtype=torch.bfloat16),
        torch.randn(4, 6).t(),  # non-contiguous
        torch.randn(3, requires_grad=True),
    ],
)
def test_tensor_value_round_trips_shapes(tensor):
    value = TensorValue.from_tensor(tensor)
    assert value.shape == tuple(tensor.shape)
    assert torch.equal(value.to_tensor(), tensor.detach())
    assert TensorValue.from_tensor(value.to_tensor()) == value


def test_to_tensor_is_fresh_and_caller_mutation_is_invisible():
    source = torch.ones(4)
    value = TensorValue.from_tensor(source)
    source.fill_(7.0)
    first = value.to_tensor()
    first.fill_(3.0)
    assert torch.equal(value.to_tensor(), torch.ones(4))
    assert value.to_tensor().data_ptr() != value.to_tensor().data_ptr()


def test_tensor_value_equality_is_on_bits():
    nan = TensorValue.from_tensor(torch.tensor([float("nan")]))
    assert nan == TensorValue.from_tensor(torch.tensor([float("nan")]))
    assert hash(nan) == hash(TensorValue.from_tensor(torch.tensor([float("nan")])))
    assert TensorValue.coerce([0.0]) != TensorValue.coerce([-0.0])
    # Same numbers, different dtype or shape: different values.
    assert TensorValue.coerce([1.0, 2.0]) != TensorValue.from_tensor(torch.tensor([1.0, 2.0]).double())
    assert TensorValue.coerce([[1.0, 2.0]]) != TensorValue.coerce([1.0, 2.0])
    assert len({TensorValue.coerce([1.0]), TensorValue.coerce([1.0]), TensorValue.coerce([2.0])}) == 2


def test_tensor_value_repr_and_fields():
    assert repr(TensorValue.from_tensor(torch.zeros(1, 4096))) == "TensorValue(float32[1, 4096])"
    assert repr(TensorValue.from_tensor(torch.tensor(1.0))) == "TensorValue(float32[])"
    value = TensorValue.coerce([1, 2, 3])
    assert value.dtype == "float32" and value.shape == (3,) and value.ndim == 1 and value.numel == 3
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        value.shape = (1, 3)


def test_tensor_value_validates_its_fields():
    with pytest.raises(ValueError, match="needs 8"):
        TensorValue(b"\x00" * 4, "float32", (2,))
    with pytest.raises(ValueError):
        TensorValue(b"\x00" * 4, "complex64", (1,))
    with pytest.raises(TypeError):
        TensorValue(b"\x00" * 4, "float32", (-1,))
    with pytest.raises(TypeError):
        TensorValue("abcd", "float32", (1,))
    with pytest.raises(ValueError, match="bytes 0 and 1"):
        TensorValue(b"\x02", "bool", (1,))
    assert TensorValue(bytearray(4), "float32", [1]).shape == (1,)


@pytest.mark.parametrize(
    "value, error",
    [
        ([1, True], TypeError),
        (["a"], TypeError),
        ([[1.0], [1.0, 2.0]], TypeError),
        ("1.0", TypeError),
        (np.ones(3), TypeError),
        (torch.ones(2, dtype=torch.complex64), TypeError),
    ],
)
def test_coerce_refuses(value, error):
    with pytest.raises(error):
        TensorValue.coerce(value)


# -- construction and normalisation ----------------------------------------------------


def test_arguments_are_normalised():
    assert Read("logits", positions=[0, 1]).positions == (0, 1)
    assert Read("logits", positions=range(3)).positions == (0, 1, 2)
    assert Read("logits", positions=np.int64(4)).positions == 4
    assert Read("logits", steps=[1, 2]).steps == (1, 2)
    assert Read("logits", steps=all).steps == "all"
    assert Read("logits").site == Site.parse("logits")
    assert Lens(layers=all).layers == "all"
    assert Lens(layers=range(2, 5)).layers == (2, 3, 4)
    assert Lens(layers=[1, -1]).layers == (1, -1)
    assert Lens(layers=3).layers == 3
    steer = Steer(np.int32(2), [1, 2], scale=2)
    assert steer.layer == 2 and type(steer.layer) is int
    assert steer.scale == 2.0 and type(steer.scale) is float
    assert Steer(0, [1.0], scale=-0.0) == Steer(0, [1.0], scale=0.0)
    assert math.copysign(1.0, Steer(0, [1.0], scale=-0.0).scale) == 1.0
    assert Steer(0, [1.0], scale=torch.tensor(0.5)).scale == 0.5
    assert Grad("logits", np.int64(5)).target == 5
    assert Source("p", site="layers[1].output").site == Site.parse("layers[1].output")


def test_defaults_match_the_contract():
    read = Read("logits")
    assert (read.positions, read.steps, read.name) == (-1, 0, None)
    assert Zero("logits").positions is None
    steer = Steer(1, [1.0])
    assert (steer.scale, steer.positions) == (1.0, None)
    lens = Lens()
    assert (lens.layers, lens.positions, lens.steps, lens.top_k, lens.name) == ("all", -1, 0, None, "lens")
    patch = Patch("logits", value=[1.0])
    assert (patch.positions, patch.source) == (-1, None)
    source = Source("p")
    assert (source.site, source.position) == (None, -1)
    assert Grad("logits", 1).positions == -1
    assert AttentionProbs(0).name is None


@pytest.mark.parametrize(
    "build, error, where",
    [
        (lambda: Read("layer[5].output"), ValueError, "Read(site=...)"),
        (lambda: Read(3), TypeError, "Read(site=...)"),
        (lambda: Read("logits", positions=[]), ValueError, "Read(positions=...)"),
        (lambda: Read("logits", positions=[0, True]), TypeError, "Read(positions=...)"),
        (lambda: Read("logits", positions=1.0), TypeError, "Read(positions=...)"),
        (lambda: Read("logits", positions="0"), TypeError, "Read(positions=...)"),
        (lambda: Read("logits", steps=-1), ValueError, "Read(steps=...)"),
        (lambda: Read("logits", steps=[0, -2]), ValueError, "Read(steps=...)"),
        (lambda: Read("logits", steps="every"), TypeError, "Read(steps=...)"),
        (lambda: Read("logits", name=""), ValueError, "Read(name=...)"),
        (lambda: Read("logits", name=3), TypeError, "Read(name=...)"),
        (lambda: Zero("logits", positions=[[1]]), TypeError, "Zero(positions=...)"),
        (lambda: Patch("logits"), ValueError, "Patch(value=..., source=...)"),
        (lambda: Patch("logits", value=[1.0], source=Source("p")), ValueError, "Patch(value=..., source=...)"),
        (lambda: Patch("logits", value=torch.tensor(1.0)), ValueError, "Patch(value=...)"),
        (lambda: Patch("logits", value=torch.ones(3, dtype=torch.int64)), TypeError, "Patch(value=...)"),
        (lambda: Patch("logits", source="other prompt"), TypeError, "Patch(source=...)"),
        (lambda: Source(""), ValueError, "Source(prompt=...)"),
        (lambda: Source(["a"]), TypeError, "Source(prompt=...)"),
        (lambda: Source("p", position=1.5), TypeError, "Source(position=...)"),
        (lambda: Source("p", site="nope"), ValueError, "Source(site=...)"),
        (lambda: Steer(True, [1.0]), TypeError, "Steer(layer=...)"),
        (lambda: Steer(1.0, [1.0]), TypeError, "Steer(layer=...)"),
        (lambda: Steer(1, torch.ones(2, 3)), ValueError, "Steer(vector=...)"),
        (lambda: Steer(1, torch.tensor(1.0)), ValueError, "Steer(vector=...)"),
        (lambda: Steer(1, None), TypeError, "Steer(vector=...)"),
        (lambda: Steer(1, [1.0], scale=float("nan")), ValueError, "Steer(scale=...)"),
        (lambda: Steer(1, [1.0], scale=float("inf")), ValueError, "Steer(scale=...)"),
        (lambda: Steer(1, [1.0], scale=True), TypeError, "Steer(scale=...)"),
        (lambda: Steer(1, [1.0], scale="2"), TypeError, "Steer(scale=...)"),
        (lambda: Steer(1, [1.0], scale=10**400), ValueError, "Steer(scale=...)"),
        (lambda: Lens(layers="some"), TypeError, "Lens(layers=...)"),
        (lambda: Lens(layers=[]), ValueError, "Lens(layers=...)"),
        (lambda: Lens(top_k=0), ValueError, "Lens(top_k=...)"),
        (lambda: Lens(top_k=2.0), TypeError, "Lens(top_k=...)"),
        (lambda: Lens(name=None), TypeError, "Lens(name=...)"),
        (lambda: Grad("logits", -1), ValueError, "Grad(target=...)"),
        (lambda: Grad("logits", None), TypeError, "Grad(target=...)"),
        (lambda: AttentionProbs("3"), TypeError, "AttentionProbs(layer=...)"),
    ],
)
def test_malformed_arguments_fail_at_construction_naming_the_argument(build, error, where):
    with pytest.raises(error) as info:
        build()
    assert str(info.value).startswith(where)


def test_keyword_only_arguments():
    with pytest.raises(TypeError):
        Read("logits", -1)
    with pytest.raises(TypeError):
        Steer(1, [1.0], 2.0)
    with pytest.raises(TypeError):
        Lens("all")


# -- values: equality, hashing, immutability -------------------------------------------


def test_equal_arguments_give_equal_hashable_nodes():
    assert Read("logits", positions=[0, 1]) == Read(Site.parse("logits"), positions=(0, 1))
    assert hash(Read("logits", positions=[0, 1])) == hash(Read("logits", positions=(0, 1)))
    assert Steer(1, torch.ones(3), scale=2) == Steer(1, [1.0, 1.0, 1.0], scale=2.0)
    assert Lens(layers=all) == Lens(layers="all")
    assert len({Read("logits"), Read("logits"), Read("logits", name="x")}) == 2
    # Same fields, different node type: different nodes.
    assert Read("logits", positions=None) != Zero("logits")
    assert Read("logits") != Read("logits", positions=[-1])


def test_nodes_are_immutable():
    node = Read("logits")
    with pytest.raises(AttributeError):
        node.name = "x"
    with pytest.raises(AttributeError):
        node.new_field = 1
    lens = Lens()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        lens.top_k = 5


def test_evolve_revalidates():
    steer = Steer(1, [1.0])
    assert attrs.evolve(steer, scale=3) == Steer(1, [1.0], scale=3.0)
    with pytest.raises(ValueError):
        attrs.evolve(steer, scale=float("nan"))
    with pytest.raises(ValueError):
        attrs.evolve(Read("logits"), site="nope")


def test_mutating_callers_tensor_changes_nothing():
    vector = torch.ones(4)
    value = torch.zeros(2, 4)
    steer = Steer(1, vector)
    patch = Patch("layers[0].output", value=value)
    before = (steer, patch, hash(steer), hash(patch))
    vector.add_(5)
    value.fill_(9)
    steer.vector.to_tensor().fill_(3)  # nor does editing what to_tensor returns
    assert torch.equal(steer.vector.to_tensor(), torch.ones(4))
    assert torch.equal(patch.value.to_tensor(), torch.zeros(2, 4))
    assert (steer, patch, hash(steer), hash(patch)) == before
    assert steer == Steer(1, torch.ones(4))


def test_nodes_pickle():
    for node in (Steer(1, [1.0, 2.0], scale=3), Patch("logits", source=Source("p", site="logits")), Lens(layers=range(2))):
        assert pickle.loads(pickle.dumps(node)) == node


# -- output names and repr -------------------------------------------------------------


def test_output_names():
    assert Read("layers[5].output").output_name == "layers[5].output"
    assert Read("layers[-1].output").output_name == "layers[-1].output"
    assert Read("logits", name="final").output_name == "final"
    assert Lens().output_name == "lens"
    assert Lens(name="lens2").output_name == "lens2"
    assert Grad("mlps[2].output", 5).output_name == "grad:mlps[2].output"
    assert Grad("mlps[2].output", 5, name="g").output_name == "g"
    assert AttentionProbs(3).output_name == "attention_probs[3]"
    assert AttentionProbs(3, name="a").output_name == "a"
    assert Zero("logits").output_name is None
    assert Patch("logits", value=[1.0]).output_name is None
    assert Steer(0, [1.0]).output_name is None


@pytest.mark.parametrize(
    "node, text",
    [
        (Read("layers[5].output"), "Read('layers[5].output')"),
        (Read("logits", positions=[0, 1], steps="all", name="x"), "Read('logits', positions=(0, 1), steps='all', name='x')"),
        (Zero("mlps[1].output"), "Zero('mlps[1].output')"),
        (Steer(3, torch.zeros(576), scale=2), "Steer(3, TensorValue(float32[576]), scale=2.0)"),
        (Patch("logits", value=torch.zeros(2, 9)), "Patch('logits', value=TensorValue(float32[2, 9]))"),
        (
            Patch("layers[1].output", source=Source("a", site="layers[2].output", position=0), positions=None),
            "Patch('layers[1].output', source=Source('a', site='layers[2].output', position=0), positions=None)",
        ),
        (Lens(layers=all, top_k=5), "Lens(top_k=5)"),
        (Lens(layers=[1, 2], name="l"), "Lens(layers=(1, 2), name='l')"),
        (Grad("logits", " Paris"), "Grad('logits', ' Paris')"),
        (AttentionProbs(-1, name="a"), "AttentionProbs(-1, name='a')"),
    ],
)
def test_repr_reads_like_code(node, text):
    assert repr(node) == text
    if "TensorValue" not in text:
        assert eval(text) == node


@settings(deadline=None, max_examples=200)
@given(data=st.data())
def test_random_nodes_are_hashable_values(node_strategy, data):
    node = data.draw(node_strategy)
    rebuilt = attrs.evolve(node)
    assert rebuilt == node and hash(rebuilt) == hash(node)
    assert isinstance(repr(node), str)
    if node.output_name is not None:
        assert isinstance(node.output_name, str) and node.output_name
