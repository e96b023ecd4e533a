"""Families nnterp was never tested on: refused when a site does not hold what it claims
(Falcon, Bloom), loaded with a warning when every check passes (GPT-J, StableLM)."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

import tiny_models

VOCAB = 49152
_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)


def _configs() -> dict:
    return {
        # parallel attention whose MLP output also carries the attention's (new decoder)
        "falcon": transformers.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, **_IDS),
        # an attention module that adds the residual stream itself
        "bloom": transformers.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=2, **_IDS),
        # parallel attention and MLP, both added to the layer's input: mapped correctly
        "gptj": transformers.GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=2, rotary_dim=16,
                                        n_positions=512, **_IDS),
        "stablelm": transformers.StableLmConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                                **_IDS),
    }


@pytest.fixture(scope="module")
def outside(tmp_path_factory, tokenizer_path):
    root = tmp_path_factory.mktemp("outside")
    return lambda family: tiny_models.build(family, root / family, tokenizer_path, config=_configs()[family])


@pytest.mark.parametrize("family", ["falcon", "bloom"])
def test_a_family_whose_sites_do_not_add_up_is_refused_with_how_to_map_it(family, outside):
    from nnterp import StandardizedTransformer
    from nnterp.errors import ArchitectureNotSupportedError

    with pytest.raises(ArchitectureNotSupportedError) as caught:
        StandardizedTransformer(outside(family))
    message = str(caught.value)
    assert f"model_type {family!r}" in message
    assert "layers_input + attentions_output + mlps_output differs from layers_output" in message
    assert "ModulePaths(" in message and "check=False" in message
    # the user who knows better can still load it
    with pytest.warns(UserWarning, match="load checks were skipped"):
        model = StandardizedTransformer(outside(family), check=False)
    assert model.num_layers == 2


@pytest.mark.parametrize("family", ["gptj", "stablelm"])
def test_a_family_whose_sites_add_up_loads_with_one_warning(family, outside):
    from nnterp import StandardizedTransformer

    with pytest.warns(UserWarning, match=f"never tested on model_type '{family}'; its sites passed"):
        model = StandardizedTransformer(outside(family))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per family and process
        StandardizedTransformer(outside(family))
    with model.trace("The capital of France is"):
        start = model.layers_input[1].save()
        added = (model.attentions_output[1] + model.mlps_output[1]).save()
        end = model.layers_output[1].save()
    torch.testing.assert_close(start + added, end, atol=1e-5, rtol=0)
