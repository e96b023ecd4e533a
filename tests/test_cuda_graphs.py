"""`cuda_graphs=`: which sites a CUDA-graph engine serves, and the errors around it.

The engine itself needs a GPU (a compiled model replaying CUDA graphs, with nnterp's
hooks compiled in); it runs in `benchmarks/throughput.py`. What is checked here holds
everywhere: the setting's validation, the hook layout it gives the engine, and the
refusals that happen before any engine starts.
"""

from __future__ import annotations

import pytest
import torch

from nnterp import BackendUnsupportedError, StandardizedTransformer
from nnterp.backends.vllm import VLLMBackend
from nnterp.backends.vllm_settings import graph_site_kinds
from nnterp.backends.vllm_settings import executor_config
from nnterp.rename import KNOWN_ARCHITECTURES
from nnterp.sites import SiteKind
from backend_settings import engine_kwargs


def test_true_serves_the_residual_stream_and_names_select_sites():
    assert graph_site_kinds(False) is None
    assert graph_site_kinds(True) == {SiteKind.LAYERS_OUTPUT}
    assert graph_site_kinds(["mlps_output", "layers_input"]) == {SiteKind.MLPS_OUTPUT, SiteKind.LAYERS_INPUT}
    assert graph_site_kinds("attentions_output") == {SiteKind.ATTENTIONS_OUTPUT}


@pytest.mark.parametrize("bad", [["layer_output"], ["logits"], ["attention_probabilities"], []])
def test_unknown_or_unservable_sites_are_refused(bad):
    with pytest.raises(ValueError, match="cuda_graphs=.*site names among embeddings_output, layers_input"):
        graph_site_kinds(bad)


def test_the_engine_is_told_which_sites_to_hook_through_its_config():
    # additional_config reaches every worker and enters vLLM's compile-cache key, so a
    # model compiled with other hooks is never reused
    config = executor_config(tuple(sorted(graph_site_kinds(["mlps_output", "layers_input"]), key=list(SiteKind).index)),
                             KNOWN_ARCHITECTURES["gpt2"], eager=False)
    assert config["sites"] == ["layers_input", "mlps_output"] and config["eager"] is False
    assert config["paths"]["layers"] == "transformer.h" and config["version"] == 1
    assert executor_config((SiteKind.LAYERS_OUTPUT,), None, eager=True)["paths"] is None


def test_a_graph_engine_serves_only_its_sites_and_says_how_to_serve_more():
    backend = VLLMBackend.__new__(VLLMBackend)  # the serving rule, without an engine
    backend.graph_kinds = graph_site_kinds(True)
    assert backend.served(SiteKind.LAYERS_OUTPUT) and backend.served(SiteKind.LOGITS)
    assert not backend.served(SiteKind.MLPS_OUTPUT)
    with pytest.raises(BackendUnsupportedError,
                       match=r"mlps_output is not served .* cuda_graphs=\['layers_output', 'mlps_output'\]"):
        backend._require(SiteKind.MLPS_OUTPUT)
    backend.graph_kinds = None  # eager: everything but attention probabilities
    assert all(backend.served(kind) for kind in SiteKind if kind is not SiteKind.ATTENTION_PROBABILITIES)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_graphs_without_a_gpu_is_refused_before_an_engine_starts(tiny_dir):
    pytest.importorskip("vllm")
    with pytest.raises(BackendUnsupportedError, match="cuda_graphs needs a GPU"):
        StandardizedTransformer(tiny_dir("llama"), backend="vllm", cuda_graphs=True)


@pytest.mark.parametrize("option", [{"cuda_graphs": True}, {"tensor_parallel_size": 2}])
def test_vllm_options_on_the_hf_backend_are_refused(tiny_dir, option):
    with pytest.raises(ValueError, match="vLLM engine option; .*load with backend='vllm'"):
        StandardizedTransformer(tiny_dir("llama"), backend="hf", **option)


def test_enforce_eager_is_nnterps_to_set(tiny_dir):
    pytest.importorskip("vllm")
    with pytest.raises(TypeError, match="enforce_eager is set by nnterp: pass cuda_graphs=True"):
        StandardizedTransformer(tiny_dir("llama"), backend="vllm", enforce_eager=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a compiled engine replaying CUDA graphs needs a GPU")
@pytest.mark.vllm
@pytest.mark.slow
def test_a_compiled_engine_runs_plans_as_an_eager_one_does(vllm_models, tiny_dir):
    """The hooks are compiled into the model and replayed with its CUDA graphs: the host's
    per-step tables must reach them (nothing baked in at capture), batch after batch."""
    from nnterp.dsl import Lens, Read, Sampling, Steer, run

    eager = vllm_models("llama")
    vector = 0.5 * torch.randn(eager.hidden_size, generator=torch.Generator().manual_seed(3))
    graph = (Steer(1, vector, scale=2.0) >> Read("layers[1].output", steps="all", name="steered")
             >> Lens(layers=[0, -1], top_k=3) >> Read("logits", steps="all"))
    prompts = ["The capital of France is", "Hi there", "One, two, three, four, five, six,"]
    with StandardizedTransformer(tiny_dir("llama"), backend="vllm", cuda_graphs=["layers_output"],
                                 **engine_kwargs()) as compiled:
        with pytest.raises(BackendUnsupportedError, match="without cuda_graphs for model.trace"):
            compiled.trace("x")
        for batch in (prompts, prompts[:1], prompts * 3):  # different captured batch sizes
            want = run(graph, eager, batch, sampling=Sampling(max_tokens=5))
            got = run(graph, compiled, batch, sampling=Sampling(max_tokens=5))
            assert got.manifest["executor"].startswith("vllm/batched")
            assert got.tokens == want.tokens
            for name in want.keys():
                a, b = got[name], want[name]
                pairs = zip(a, b) if isinstance(b, (list, tuple)) else [(a, b)]
                for x, y in pairs:
                    for xx, yy in (zip(x, y) if isinstance(y, tuple) else [(x, y)]):
                        if yy.dtype.is_floating_point:
                            # the same kernels up to compilation: per-token bf16/float32 rounding
                            torch.testing.assert_close(xx.float(), yy.float(), atol=2e-2, rtol=2e-2)
