"""Families nnterp was never tested on: refused when a site does not hold what it claims
(Falcon, Bloom), loaded with a warning when every check passes (GPT-J, StableLM)."""

from __future__ import annotations

import os
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


_VLLM_SCRIPT = """
import sys, warnings
from nnterp import StandardizedTransformer
from nnterp.errors import ArchitectureNotSupportedError

if __name__ == "__main__":
    kwargs = dict(backend="vllm", quiet=True, kv_cache_memory_bytes=32 << 20, max_model_len=512)
    try:
        StandardizedTransformer(sys.argv[1], **kwargs)
        print("STABLELM LOADED")
    except ArchitectureNotSupportedError as error:
        print("STABLELM REFUSED", str(error).replace("\\n", " | "))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = StandardizedTransformer(sys.argv[2], **kwargs)
    print("FALCON WARNED", any("never tested on model_type 'falcon'; its sites passed" in str(w.message)
                               for w in caught))
    with model.trace("The capital of France is"):
        start = model.layers_input[1].save()
        added = (model.attentions_output[1] + model.mlps_output[1]).save()
        end = model.layers_output[1].save()
    print("FALCON IDENTITY", float((start + added - end).abs().max() / end.abs().max()))
    model.close()
"""


def test_vllm_checks_an_untested_family_at_load(outside, tmp_path):
    """vLLM's StableLM layer returns (stream, mid-layer residual), not the (hidden,
    residual) pair whose sum is the stream: read as a pair, every site was wrong without a
    word. The load check refuses it; vLLM's Falcon, whose modules are what the layer adds,
    loads with the untested-family warning and its sites add up."""
    pytest.importorskip("vllm")
    import subprocess
    import sys

    script = tmp_path / "check.py"
    script.write_text(_VLLM_SCRIPT)
    # its own process, as tests of refusals are (a refused engine closes, which would tear
    # down the distributed state of the suite's in-process engines); its engines run in
    # that process, as the suite's do, which saves two engine processes' imports each
    environment = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    result = subprocess.run([sys.executable, str(script), str(outside("stablelm")), str(outside("falcon"))],
                            capture_output=True, text=True, timeout=600, env=environment)
    lines = {line.split(" ", 2)[0] + " " + line.split(" ", 2)[1]: line for line in result.stdout.splitlines()
             if line.startswith(("STABLELM ", "FALCON "))}
    assert result.returncode == 0, result.stderr[-3000:]
    refused = lines["STABLELM REFUSED"]
    assert "model_type 'stablelm'" in refused
    assert "layers_input + attentions_output + mlps_output differs from layers_output" in refused
    assert "check=False" in refused
    assert lines["FALCON WARNED"].endswith("True")
    assert float(lines["FALCON IDENTITY"].split()[-1]) < 1e-5
