"""ModelSpec and validation: each rule alone, all problems together, and validate's inputs."""

from __future__ import annotations

import json
import pickle
from types import SimpleNamespace

import attrs
import pytest
import torch

from nnterp.dsl import (
    AttentionProbs,
    Grad,
    Graph,
    Lens,
    ModelSpec,
    Patch,
    Problem,
    Read,
    Source,
    Steer,
    ValidationError,
    Zero,
    validate,
)
from nnterp.dsl.validate import RunFacts, problems
from nnterp.errors import NnterpError

# -- ModelSpec -------------------------------------------------------------------------


def test_model_spec_defaults_and_supported_by_backend():
    hf = ModelSpec(4, 8, 2, 100)
    assert hf.backend == "hf" and hf.attention_probs_enabled is False
    assert {Grad, AttentionProbs, Read, Zero, Patch, Steer, Lens} == hf.supported
    vllm = ModelSpec(4, 8, 2, 100, backend="vllm")
    assert vllm.supported == {Read, Zero, Patch, Steer, Lens}
    assert ModelSpec(4, 8, 2, 100, supported=[Read]).supported == frozenset({Read})
    with pytest.raises(AttributeError):
        hf.num_layers = 5
    assert hash(hf) == hash(ModelSpec(4, 8, 2, 100))


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"num_layers": 0}, ValueError),
        ({"hidden_size": 8.0}, TypeError),
        ({"vocab_size": True}, TypeError),
        ({"backend": "tpu"}, ValueError),
        ({"attention_probs_enabled": 1}, TypeError),
        ({"supported": [int]}, TypeError),
    ],
)
def test_model_spec_checks_its_fields(kwargs, error):
    base = {"num_layers": 4, "hidden_size": 8, "num_heads": 2, "vocab_size": 100}
    with pytest.raises(error):
        ModelSpec(**{**base, **kwargs})


def _fake_model(backend="hf", probs=None):
    extra = {} if probs is None else {"attention_probs_enabled": probs}
    return SimpleNamespace(num_layers=4, hidden_size=8, num_heads=2, vocab_size=100, backend=backend, **extra)


def test_from_model_is_duck_typed():
    spec = ModelSpec.from_model(_fake_model(probs=True))
    assert spec == ModelSpec(4, 8, 2, 100, attention_probs_enabled=True)
    assert ModelSpec.from_model(_fake_model()).attention_probs_enabled is False
    assert ModelSpec.from_model(_fake_model(backend="vllm")).supported == ModelSpec(4, 8, 2, 100, backend="vllm").supported
    with pytest.raises(TypeError, match="num_layers"):
        ModelSpec.from_model(SimpleNamespace(hidden_size=3))


@pytest.mark.parametrize(
    "config",
    [
        SimpleNamespace(num_hidden_layers=4, hidden_size=8, num_attention_heads=2, vocab_size=100),
        SimpleNamespace(n_layer=4, n_embd=8, n_head=2, vocab_size=100),  # gpt2 spelling
        {"num_hidden_layers": 4, "hidden_size": 8, "num_attention_heads": 2, "vocab_size": 100},
        SimpleNamespace(  # gemma3-style: the language model is in text_config
            text_config=SimpleNamespace(num_hidden_layers=4, hidden_size=8, num_attention_heads=2, vocab_size=100),
            hidden_size=1152,
        ),
    ],
)
def test_from_config_spellings(config):
    assert ModelSpec.from_config(config, "vllm") == ModelSpec(4, 8, 2, 100, backend="vllm")


def test_from_config_missing_size():
    with pytest.raises(ValueError, match="num_attention_heads"):
        ModelSpec.from_config(SimpleNamespace(num_hidden_layers=4, hidden_size=8, vocab_size=100))


# -- one bad node, one problem ---------------------------------------------------------

SPEC = ModelSpec(num_layers=4, hidden_size=8, num_heads=2, vocab_size=100, attention_probs_enabled=True)

ONE_PROBLEM = [
    (Read("layers[4].output"), "nodes[0] Read.site"),
    (Read("layers[-5].input"), "nodes[0] Read.site"),
    (Zero("attentions[9].output"), "nodes[0] Zero.site"),
    (Patch("mlps[4].output", value=[0.0] * 8), "nodes[0] Patch.site"),
    (Patch("layers[0].output", source=Source("p", site="layers[7].output")), "nodes[0] Patch.source.site"),
    (Grad("layers[100].output", 3), "nodes[0] Grad.site"),
    (Steer(4, [0.0] * 8), "nodes[0] Steer.layer"),
    (Steer(0, [0.0] * 7), "nodes[0] Steer.vector"),
    (AttentionProbs(-5), "nodes[0] AttentionProbs.layer"),
    (Lens(layers=[0, 4, -5]), "nodes[0] Lens.layers"),
    (Lens(layers=4), "nodes[0] Lens.layers"),
    (Lens(top_k=101), "nodes[0] Lens.top_k"),
    (Patch("layers[0].output", value=torch.zeros(3, 9)), "nodes[0] Patch.value"),
    (Patch("logits", value=torch.zeros(8)), "nodes[0] Patch.value"),
    (Patch("logits", source=Source("p", site="layers[0].output")), "nodes[0] Patch.source.site"),
    (Patch("embeddings.output", source=Source("p", site="logits")), "nodes[0] Patch.source.site"),
    (Grad("logits", ""), "nodes[0] Grad.target"),
    (Grad("logits", 100), "nodes[0] Grad.target"),
    (Steer(0, [0.0] * 7 + [float("nan")]), "nodes[0] Steer.vector"),
    (Patch("layers[0].output", value=torch.full((8,), float("inf"))), "nodes[0] Patch.value"),
    (Patch("layers[0].output", value=torch.zeros(3, 8), positions=[0, 1]), "nodes[0] Patch.value"),
    (Read("layers[0].output", steps=[1, 2], positions=0), "nodes[0] Read.positions"),
    (Lens(steps=[3], positions=[-2, -1]), "nodes[0] Lens.positions"),
    (Read("logits", positions=-2), "nodes[0] Read.positions"),
    (Zero("logits", positions=[0, 1]), "nodes[0] Zero.positions"),
]


@pytest.mark.parametrize("node, where", ONE_PROBLEM)
def test_each_rule_reports_exactly_one_problem(node, where):
    found = problems(Graph([node]), SPEC)
    assert len(found) == 1
    (problem,) = found
    assert problem.where == where
    assert problem.node_index == 0
    assert problem.node is node
    assert problem.what and problem.fix


@pytest.mark.parametrize("backend_spec", [SPEC, attrs.evolve(SPEC, backend="vllm", supported={Read, Zero, Patch, Steer, Lens}, attention_probs_enabled=False)])
def test_valid_graphs_have_no_problems(backend_spec):
    g = (
        Read("layers[-4].output", steps="all")
        >> Read("layers[3].input", positions=None, name="inp")
        >> Zero("mlps[-1].output", positions=[0, 1])
        >> Patch("logits", value=torch.zeros(1, 100))  # one row per position
        >> Patch("layers[1].output", source=Source("p", site="attentions[2].output"))
        >> Patch("layers[1].output", source=Source("p", position=None), positions=None)
        >> Patch("layers[1].output", source=Source("p", position=[0, 2]), positions=[1, 3])
        >> Steer(-1, torch.ones(8), scale=3, positions=None)
        >> Lens(layers=[0, -1], top_k=100, steps=[1, 2])
        >> Lens(layers=all, name="lens_all")
    )
    assert problems(g, backend_spec) == ()
    assert validate(g, backend_spec) is backend_spec


def test_non_finite_values_are_counted_in_the_message():
    (problem,) = problems(Graph([Steer(0, torch.tensor([1.0, float("nan"), float("-inf")] + [0.0] * 5))]), SPEC)
    assert "2 NaN or infinite" in problem.what and problem.fix


RUN = RunFacts(prompt_lengths=(5, 2), source_lengths=(("src", 3),), max_tokens=1)

RUN_PROBLEMS = [
    (Read("layers[0].output", positions=[0, 4]), RUN, "nodes[0] Read.positions"),
    (Read("layers[0].output", positions=-3), RUN, "nodes[0] Read.positions"),
    (Lens(positions=2), RUN, "nodes[0] Lens.positions"),
    (Zero("mlps[1].output", positions=[2]), RUN, "nodes[0] Zero.positions"),
    (Steer(1, [0.0] * 8, positions=[3]), RUN, "nodes[0] Steer.positions"),
    (Grad("layers[0].output", 3, positions=[-4]), RUN, "nodes[0] Grad.positions"),
    (Patch("layers[0].output", source=Source("src", position=3)), RUN, "nodes[0] Patch.source.position"),
    (Patch("layers[0].output", value=torch.zeros(2, 8), positions=None), RUN, "nodes[0] Patch.value"),
    (Grad("logits", 1), attrs.evolve(RUN, max_tokens=2), "nodes[0] Grad"),
    (Read("logits", steps=3), attrs.evolve(RUN, max_tokens=3), "nodes[0] Read.steps"),
    (Lens(steps=[0, 1]), RUN, "nodes[0] Lens.steps"),
]


@pytest.mark.parametrize("node, run, where", RUN_PROBLEMS)
def test_run_facts_each_rule_reports_exactly_one_problem(node, run, where):
    assert problems(Graph([node]), SPEC) == ()  # fine without the run's prompts
    (problem,) = problems(Graph([node]), SPEC, run)
    assert problem.where == where and problem.node_index == 0 and problem.fix


def test_positions_every_prompt_has_pass():
    ok = (Read("layers[0].output", positions=[0, 1, -2]) >> Lens(positions=None) >> Steer(1, [0.0] * 8)
          >> Read("layers[1].output", positions=[0, 1], steps="all", name="both")
          >> Patch("layers[0].output", source=Source("src", position=-3))
          >> Patch("layers[1].output", value=torch.zeros(1, 8), positions=[1]))
    assert problems(ok, SPEC, RUN) == ()


def test_duplicate_output_names_point_at_the_later_node():
    g = Read("logits") >> Lens() >> Read("logits", positions=0) >> Lens(name="x") >> Read("embeddings.output", name="x") >> Lens()
    found = problems(g, SPEC)
    assert [(p.node_index, p.where) for p in found] == [
        (2, "nodes[2] Read"),
        (4, "nodes[4] Read"),
        (5, "nodes[5] Lens"),
    ]
    assert "nodes[0]" in found[0].what and "nodes[3]" in found[1].what and "nodes[1]" in found[2].what
    assert "name=" in found[0].fix


def test_grad_and_attention_probs_on_vllm_name_the_hf_backend():
    vllm = ModelSpec(4, 8, 2, 100, backend="vllm")
    found = problems(Grad("logits", 1) >> AttentionProbs(0), vllm)
    assert [(p.node_index, p.where) for p in found] == [(0, "nodes[0] Grad"), (1, "nodes[1] AttentionProbs")]
    for problem in found:
        assert "vllm" in problem.what and "backend='hf'" in problem.fix
    assert "enable_attention_probs=True" in found[1].fix


def test_attention_probs_need_them_enabled_on_hf():
    off = ModelSpec(4, 8, 2, 100)
    (problem,) = problems(Graph([AttentionProbs(1)]), off)
    assert problem.where == "nodes[0] AttentionProbs"
    assert "enable_attention_probs=True" in problem.fix
    assert problems(Graph([AttentionProbs(1)]), attrs.evolve(off, attention_probs_enabled=True)) == ()


def test_every_problem_is_reported_in_graph_order():
    g = Graph(
        [
            Read("layers[1].output"),  # fine
            Steer(9, [0.0] * 3),  # layer and width
            Lens(top_k=1000),  # top_k
            Read("layers[1].output"),  # duplicate name
            Grad("mlps[8].output", 500),  # site and target
        ]
    )
    found = problems(g, SPEC)
    assert [(p.node_index, p.where) for p in found] == [
        (1, "nodes[1] Steer.layer"),
        (1, "nodes[1] Steer.vector"),
        (2, "nodes[2] Lens.top_k"),
        (3, "nodes[3] Read"),
        (4, "nodes[4] Grad.site"),
        (4, "nodes[4] Grad.target"),
    ]
    with pytest.raises(ValidationError) as info:
        validate(g, SPEC)
    err = info.value
    assert err.problems == found
    assert isinstance(err, ValueError) and isinstance(err, NnterpError)
    lines = str(err).splitlines()
    assert lines[0] == "the graph has 6 problems for hf model (4 layers, hidden_size 8):"
    assert [line.split(".", 1)[0] for line in lines[1:]] == ["1", "2", "3", "4", "5", "6"]
    assert lines[2].startswith("2. nodes[1] Steer.vector: steering vector has 3 features but this model's hidden_size is 8")


def test_problem_fields_equality_and_text():
    a = Problem("nodes[0] Read", "bad", "do this", 0, node=Read("logits"))
    b = Problem("nodes[0] Read", "bad", "do this", 0)
    assert a == b and hash(a) == hash(b)  # the node is not part of equality
    assert str(a) == "nodes[0] Read: bad; fix: do this"
    with pytest.raises(AttributeError):
        a.what = "x"


def test_validation_error_pickles():
    err = ValidationError([Problem("nodes[0] Read", "bad", "do this", 0)])
    back = pickle.loads(pickle.dumps(err))
    assert back.problems == err.problems and str(back) == str(err)


# -- validate()'s model argument -------------------------------------------------------


def test_validate_accepts_a_single_node_and_rejects_other_graphs():
    assert validate(Read("logits"), SPEC) is SPEC
    with pytest.raises(TypeError, match=r"Graph\(\[\.\.\.\]\)"):
        validate([Read("logits")], SPEC)


def test_validate_with_a_spec_and_another_backend():
    with pytest.raises(ValidationError) as info:
        validate(Graph([Grad("logits", 1)]), SPEC, backend="vllm")
    assert [p.where for p in info.value.problems] == ["nodes[0] Grad"]
    assert validate(Graph([Grad("logits", 1)]), SPEC, backend="hf") is SPEC


def test_validate_with_a_loaded_model():
    model = _fake_model(backend="hf", probs=False)
    with pytest.raises(ValidationError) as info:
        validate(Graph([AttentionProbs(0)]), model)
    assert "enable_attention_probs=True" in info.value.problems[0].fix
    assert validate(Graph([AttentionProbs(0)]), _fake_model(probs=True)).attention_probs_enabled
    with pytest.raises(ValidationError) as info:
        validate(Graph([Read("logits")]), model, backend="vllm")
    (problem,) = info.value.problems
    assert problem.where == "model" and problem.node_index is None
    with pytest.raises(TypeError, match="StandardizedTransformer"):
        validate(Graph([Read("logits")]), object())


def test_validate_unknown_backend():
    with pytest.raises(ValidationError) as info:
        validate(Graph([Read("logits")]), SPEC, backend="tpu")
    assert "'hf', 'vllm'" in info.value.problems[0].fix


def _write_config(folder, **overrides):
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 4,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": 100,
        **overrides,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_validate_by_path_reads_only_the_config(tmp_path):
    folder = _write_config(tmp_path / "tiny")
    spec = validate(Read("layers[-1].output") >> AttentionProbs(0), folder)
    assert (spec.num_layers, spec.hidden_size, spec.num_heads, spec.vocab_size, spec.backend) == (4, 8, 2, 100, "hf")
    assert spec.attention_probs_enabled  # run() loads a named model with them when needed
    with pytest.raises(ValidationError) as info:
        validate(Steer(0, [0.0] * 8) >> Grad("logits", 1) >> Read("layers[4].output"), str(folder), backend="vllm")
    assert [p.where for p in info.value.problems] == ["nodes[1] Grad", "nodes[2] Read.site"]


def test_validate_bundled_name_goes_through_resolve_model_name(tmp_path, monkeypatch):
    import nnterp.bundled

    folder = _write_config(tmp_path / "bundled-copy", num_hidden_layers=30, hidden_size=576, num_attention_heads=9, vocab_size=49152)
    seen = []

    def resolve(name):
        seen.append(name)
        return str(folder)

    monkeypatch.setattr(nnterp.bundled, "resolve_model_name", resolve)
    spec = validate(Read("layers[29].output"), "bundled", backend="vllm")
    assert seen == ["bundled"]
    assert (spec.num_layers, spec.hidden_size, spec.backend) == (30, 576, "vllm")


def test_validate_unreadable_config(tmp_path):
    with pytest.raises(ValidationError) as info:
        validate(Read("logits"), tmp_path / "does-not-exist")
    (problem,) = info.value.problems
    assert problem.where == "model" and "does-not-exist" in problem.what
    folder = tmp_path / "no-sizes"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": "four"}))
    with pytest.raises(ValidationError):
        validate(Read("logits"), folder)


def test_a_prompt_and_its_generation_past_the_context_is_a_problem_listing_each_prompt():
    spec = ModelSpec(num_layers=2, hidden_size=4, num_heads=1, vocab_size=10, backend="vllm", max_model_len=64)
    fine = problems(Graph([Read("layers[0].output")]), spec, RunFacts(prompt_lengths=(50, 44), max_tokens=14))
    assert fine == ()
    found = problems(Graph([Read("layers[0].output")]), spec, RunFacts(prompt_lengths=(50, 60, 44), max_tokens=15))
    assert len(found) == 1 and found[0].where == "prompts"
    assert "prompts[0] (50 tokens), prompts[1] (60 tokens)" in found[0].what and "prompts[2]" not in found[0].what
    assert "64" in found[0].what and "lower max_tokens to 4" in found[0].fix
    # no limit known (HF, or a spec without one): nothing to check
    unlimited = attrs.evolve(spec, max_model_len=None)
    assert problems(Graph([Read("layers[0].output")]), unlimited, RunFacts(prompt_lengths=(500,), max_tokens=99)) == ()


def test_engine_limits_in_the_spec_are_checked_before_anything_runs():
    """A CUDA-graph engine's sites and the executor's vector table are part of the
    model's description: a graph past them is refused by validation, with every problem
    at once, instead of failing mid-run."""
    from nnterp.sites import SiteKind

    spec = ModelSpec(num_layers=4, hidden_size=8, num_heads=2, vocab_size=100, backend="vllm",
                     served_sites={SiteKind.LAYERS_OUTPUT, SiteKind.LOGITS}, vector_rows=3)
    graph = (Read("mlps[0].output") >> Steer(1, [1.0] * 8) >> Steer(2, [2.0] * 8) >> Steer(3, [3.0] * 8)
             >> Read("logits") >> Lens(top_k=2))
    with pytest.raises(ValidationError) as caught:
        validate(graph, spec)
    found = caught.value.problems
    assert [p.where for p in found] == ["nodes[0] Read.site", "graph"]
    assert "mlps_output is not served by this CUDA-graph engine" in found[0].what
    assert "cuda_graphs=['layers_output', 'logits', 'mlps_output']" in found[0].fix
    assert "need at least 3 rows" in found[1].what and "vector_rows=4" in found[1].fix
    assert validate(Read("layers[0].output") >> Steer(1, [1.0] * 8), spec) is spec


def test_a_node_a_backend_lacks_names_the_backends_that_run_it():
    spec = ModelSpec(num_layers=4, hidden_size=8, num_heads=2, vocab_size=100, backend="vllm")
    with pytest.raises(ValidationError) as caught:
        validate(Grad("layers[1].output", 3), spec)
    assert "it runs on 'hf'" in caught.value.problems[0].what
