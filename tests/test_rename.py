"""`paths_for` finds a family's components in every module tree it takes.

The trees are built from torch modules with the names each one uses (no weights, no
engine): Hugging Face's, vLLM's own model where it differs (Gemma 2 unembeds with its
embedding module and scales the embeddings outside it), and vLLM's generic transformers
back end (Hugging Face's base model under ``model``, vLLM's ``lm_head`` beside it).
The engine tests (tests/test_vllm_backend.py) then check that the sites mean the same.
"""

from __future__ import annotations

import torch

from nnterp.rename import KNOWN_ARCHITECTURES, ModulePaths, missing_paths, paths_for


def _tree(spec: dict) -> torch.nn.Module:
    """A module tree from ``{"name": subtree or None}``; a float is a buffer."""
    module = torch.nn.Module()
    for name, child in spec.items():
        if isinstance(child, float):
            module.register_buffer(name, torch.tensor(child))
        elif isinstance(child, list):
            module.add_module(name, torch.nn.ModuleList(_tree(item) for item in child))
        else:
            module.add_module(name, _tree(child or {}))
    return module


def _gpt_neox_base() -> dict:
    return {"embed_in": None, "layers": [{"attention": None, "mlp": None}], "final_layer_norm": None}


def test_hugging_faces_tree_keeps_the_tables_paths():
    hf = _tree({"gpt_neox": _gpt_neox_base(), "lm_head": None})
    assert paths_for("gpt_neox", hf) == KNOWN_ARCHITECTURES["gpt_neox"]


def test_vllms_transformers_backend_is_found_below_model():
    tree = _tree({"model": _gpt_neox_base(), "lm_head": None, "logits_processor": None})
    paths = paths_for("gpt_neox", tree)
    assert (paths.layers, paths.embeddings, paths.final_norm, paths.lm_head) == (
        "model.layers", "model.embed_in", "model.final_layer_norm", "lm_head")
    assert missing_paths(tree, paths) == []


def test_vllms_own_gpt_neox_calls_its_unembedding_embed_out():
    tree = _tree({"gpt_neox": _gpt_neox_base(), "embed_out": None})
    assert paths_for("gpt_neox", tree).lm_head == "embed_out"


def test_vllms_gemma2_unembeds_with_its_embeddings_and_scales_them_outside():
    tree = _tree({"model": {"embed_tokens": None, "layers": [{"self_attn": None, "mlp": None,
                                                                "post_attention_layernorm": None,
                                                                "post_feedforward_layernorm": None}],
                            "norm": None, "normalizer": 8.0}, "logits_processor": None})
    paths = paths_for("gemma2", tree)
    assert (paths.lm_head, paths.embeddings_multiplier) == ("model.embed_tokens", "model.normalizer")
    assert paths.layers == "model.layers"


def test_hugging_faces_gemma_scales_inside_the_module_so_nothing_is_added():
    tree = _tree({"model": {"embed_tokens": {"embed_scale": 8.0},
                            "layers": [{"self_attn": None, "mlp": None, "post_attention_layernorm": None,
                                        "post_feedforward_layernorm": None}],
                            "norm": None}, "lm_head": None})
    assert paths_for("gemma2", tree) == KNOWN_ARCHITECTURES["gemma2"]


def test_a_tree_no_layout_fits_is_reported_against_the_families_own_paths():
    tree = _tree({"model": {"blocks": [{}]}})
    paths = paths_for("llama", tree)
    assert paths == KNOWN_ARCHITECTURES["llama"]
    assert "layers: no module at 'model.layers'" in missing_paths(tree, paths)


def test_a_multiplier_that_does_not_resolve_is_a_missing_path():
    tree = _tree({"model": {"embed_tokens": None, "layers": [{"self_attn": None, "mlp": None}]}, "lm_head": None})
    paths = ModulePaths(layers="model.layers", attention="self_attn", mlp="mlp", embeddings="model.embed_tokens",
                        final_norm=None, lm_head="lm_head", embeddings_multiplier="model.scale")
    assert missing_paths(tree, paths) == ["embeddings_multiplier: no module at 'model.scale'"]
