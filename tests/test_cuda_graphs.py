"""`cuda_graphs=`: which sites a CUDA-graph engine serves, and the errors around it.

The engine itself needs a GPU (tapped CUDA graphs); it ran in `benchmarks/throughput.py`
on an H100. What is checked here holds everywhere: the setting's validation, the taps it
asks nnsight for, and the refusals that happen before any engine starts.
"""

from __future__ import annotations

import pytest
import torch

from nnterp import BackendUnsupportedError, StandardizedTransformer
from nnterp.backends.vllm import VLLMBackend, _tap_patterns, graph_site_kinds
from nnterp.rename import KNOWN_ARCHITECTURES
from nnterp.sites import SiteKind


def test_true_serves_the_residual_stream_and_names_select_sites():
    assert graph_site_kinds(False) is None
    assert graph_site_kinds(True) == {SiteKind.LAYERS_OUTPUT}
    assert graph_site_kinds(["mlps_output", "layers_input"]) == {SiteKind.MLPS_OUTPUT, SiteKind.LAYERS_INPUT}
    assert graph_site_kinds("attentions_output") == {SiteKind.ATTENTIONS_OUTPUT}


@pytest.mark.parametrize("bad", [["layer_output"], ["logits"], ["attention_probabilities"], []])
def test_unknown_or_unservable_sites_are_refused(bad):
    with pytest.raises(ValueError, match="cuda_graphs=.*site names among embeddings_output, layers_input"):
        graph_site_kinds(bad)


def test_taps_are_module_paths_with_a_wildcard_layer():
    paths = KNOWN_ARCHITECTURES["llama"]
    assert _tap_patterns(paths, graph_site_kinds(True)) == ["model.layers.*.output"]
    assert _tap_patterns(paths, graph_site_kinds(
        ["mlps_output", "attentions_output", "layers_input", "embeddings_output"])) == [
        "model.embed_tokens.output", "model.layers.*.input", "model.layers.*.self_attn.output",
        "model.layers.*.mlp.output"]


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
