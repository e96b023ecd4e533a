"""`model.weight(name)` reads the same tensor on both backends, in Hugging Face's layout.

On HF the weight is the module's own tensor (GPT-2's ``Conv1D`` transposed to
``[out, in]``, packed q/k/v cut apart). On vLLM it comes from the engine's workers, cut
out of vLLM's merged ``qkv_proj``/``gate_up_proj`` and stripped of the vocabulary's
padding (tests/test_tensor_parallel.py checks the shards of tensor parallelism): it must
equal HF's exactly. The client's meta-device copy of a vLLM model refuses to compute
with its weights, with a message that points to ``model.weight``.

Real models only: the bundled SmolLM2 (Llama, tied unembedding) and a tiny random GPT-2,
on the session's engines (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from nnterp import BackendUnsupportedError
from nnterp.backends.weights import HeadLayout, assemble, unpack
from nnterp.rename import KNOWN_ARCHITECTURES
from nnterp.weight_map import weight_ref

PROMPT = "The capital of France is"


def _token(model, text: str) -> int:
    return model.tokenizer(text, add_special_tokens=False)["input_ids"][0]


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal to the bit, in the engine's dtype (HF's model of the same checkpoint in the
    test dtype holds the same roundings)."""
    return got.shape == want.shape and torch.equal(got.cpu(), want.to(got.dtype).cpu())


# -- the pieces, without a model -------------------------------------------------------------


def test_packed_parts_are_cut_where_their_layout_puts_them():
    heads = HeadLayout(heads=2, kv_heads=1, head_dim=3)
    rows = torch.arange(12.0)[:, None]  # q: rows 0-5, k: 6-8, v: 9-11
    assert unpack(rows, "qkv", 2, heads).flatten().tolist() == [9.0, 10.0, 11.0]
    assert unpack(rows[:8], "halves", 1, heads).flatten().tolist() == [4.0, 5.0, 6.0, 7.0]
    per_head = torch.arange(18.0)  # head 0: q 0-2, k 3-5, v 6-8; head 1: q 9-11, ...
    assert unpack(per_head, "qkv_per_head", 1, HeadLayout(2, 2, 3)).tolist() == [3.0, 4.0, 5.0, 12.0, 13.0, 14.0]


def test_shards_are_put_together_by_offset_and_replicas_count_once():
    a, b = torch.zeros(2, 4), torch.ones(3, 4)
    whole = assemble([(0, 2, 5, b), (0, 0, 5, a), (0, 0, 5, a.clone())])  # rank order scrambled, a replica
    assert whole.shape == (5, 4) and whole[2:].eq(1).all()
    columns = assemble([(1, 4, 8, torch.ones(3, 4)), (1, 0, 8, torch.zeros(3, 4))])
    assert columns.shape == (3, 8) and columns[:, 4:].eq(1).all()
    with pytest.raises(RuntimeError, match="nnterp bug"):
        assemble([(0, 0, 5, a)])  # a missing shard is never returned as the whole


def test_a_family_whose_layers_nnterp_does_not_map_names_itself():
    paths = KNOWN_ARCHITECTURES["llama"]
    assert weight_ref("unembedding", paths, "mystery", 4).module == "lm_head"
    with pytest.raises(NotImplementedError, match="'mystery' models"):
        weight_ref("layers[0].attention.q", paths, "mystery", 4)


# -- HF --------------------------------------------------------------------------------------


def test_hf_weights_are_the_modules_tensors(hf_models):
    model = hf_models("bundled")
    root = model.nnsight_model._module
    london = _token(model, " London")
    names = model.weight_names()
    assert names[0] == "embedding" and names[-2:] == ["final_norm", "unembedding"]
    assert len(names) == 3 + 9 * model.num_layers  # SmolLM2: no biases
    assert torch.equal(model.weight("unembedding")[london], root.lm_head.weight[london])
    assert torch.equal(model.weight("layers[-1].attention.k"), root.model.layers[29].self_attn.k_proj.weight)
    assert torch.equal(model.weight("layers[3].mlp_norm"), root.model.layers[3].post_attention_layernorm.weight)
    copy = model.weight("final_norm")
    copy.zero_()  # a tensor of its own: the model is untouched
    assert root.model.norm.weight.abs().sum() > 0


def test_hf_gpt2_linear_weights_read_out_by_in(hf_models):
    model = hf_models("gpt2")
    block = model.nnsight_model._module.transformer.h[1]
    hidden = model.hidden_size
    c_attn = block.attn.c_attn  # Conv1D: weight [in, 3 * hidden], columns q | k | v
    assert torch.equal(model.weight("layers[1].attention.v"), c_attn.weight[:, 2 * hidden:].t())
    assert torch.equal(model.weight("layers[1].attention.k.bias"), c_attn.bias[hidden:2 * hidden])
    assert model.weight("layers[1].mlp.down").shape == (hidden, 4 * hidden)
    assert torch.equal(model.weight("position_embedding"), model.nnsight_model._module.transformer.wpe.weight)
    assert "layers[0].mlp.gate" not in model.weight_names()


def test_an_unknown_name_gets_the_closest_one_and_the_list(hf_models):
    model = hf_models("bundled")
    with pytest.raises(ValueError, match=r"did you mean 'layers\[3\]\.attention\.q'\?") as info:
        model.weight("layers[3].attention.query")
    assert "layers[i].{attention_norm, attention.q, attention.k" in str(info.value)
    with pytest.raises(ValueError, match="has no weight 'layers.3..mlp_output_norm'"):
        model.weight("layers[3].mlp_output_norm")  # a standardized name SmolLM2 has no module for
    with pytest.raises(IndexError, match="valid: -30..29"):
        model.weight("layers[30].attention.q")


# -- vLLM ------------------------------------------------------------------------------------


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_unembedding_row_of_london_is_hfs(hf_models, vllm_models):
    """The README's steering direction, read on vLLM: SmolLM2 ties its unembedding to the
    embedding, which vLLM pads to a multiple of 64 rows."""
    hf, vllm = hf_models("bundled"), vllm_models("bundled")
    london = _token(hf, " London")
    got, want = vllm.weight("unembedding")[london], hf.weight("unembedding")[london]
    assert got.device.type == "cpu" and got.shape == (hf.hidden_size,)
    assert _same(got, want)
    assert _same(vllm.weight("unembedding"), vllm.weight("embedding"))  # tied


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("family", ["bundled", "gpt2"])
def test_vllm_every_weight_is_hfs(family, hf_models, vllm_models):
    """Every name: vLLM's merged qkv_proj and gate_up_proj (SmolLM2) and GPT-2's packed
    c_attn with its biases, cut apart; linear weights that vLLM's CPU backend repacked for
    its kernels; LayerNorm biases; GPT-2's learned positions."""
    hf, vllm = hf_models(family), vllm_models(family)
    names = vllm.weight_names()
    assert names == hf.weight_names()
    wrong = [name for name in names if not _same(vllm.weight(name), hf.weight(name))]
    assert not wrong, f"{family}: {len(wrong)} of {len(names)} weights differ from HF's, e.g. {wrong[:5]}"


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_steers_with_a_weight_as_hf_does(hf_models, vllm_models):
    """The README's steer, on vLLM: the direction read outside the trace, and the same row
    read inside it (in the engine's worker)."""
    vllm = vllm_models("bundled")
    london = _token(vllm, " London")
    direction = vllm.weight("unembedding")[london]
    direction = direction / direction.norm()
    with vllm.trace(PROMPT):
        vllm.steer(layers=25, vector=direction, scale=90.0)
        steered = vllm.next_token_probs.save()
        inside = vllm.weight("unembedding")[london].save()
    assert vllm.tokenizer.decode(steered[0].argmax()) == " London"
    assert _same(inside, hf_models("bundled").weight("unembedding")[london])


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_meta_weights_say_to_use_model_weight(vllm_models):
    vllm = vllm_models("bundled")
    weight = vllm.nnsight_model.lm_head.weight
    # what the module tree is for here still works: shapes, dtypes, devices
    assert weight.is_meta and weight.shape == (vllm.vocab_size, vllm.hidden_size) and weight.numel() > 0
    assert weight.dtype == vllm.weight("final_norm").dtype
    for use in (lambda w: w[0].detach().clone(), lambda w: w.cpu(), lambda w: w.norm(),
                lambda w: w.detach()[0], lambda w: w.tolist(), lambda w: w.data @ torch.ones(vllm.hidden_size)):
        with pytest.raises(BackendUnsupportedError, match=r"model\.weight\('unembedding'\)"):
            use(weight)
    detached = weight.detach()  # an alias, still without values; shipped into a trace it explains itself
    with pytest.raises(BackendUnsupportedError, match=r"model\.weight"):
        with vllm.trace(PROMPT):
            vllm.steer(layers=25, vector=detached[0], scale=1.0)
            vllm.next_token_probs.save()


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_unknown_name_is_refused_as_on_hf(hf_models, vllm_models):
    errors = []
    for model in (hf_models("bundled"), vllm_models("bundled")):
        with pytest.raises(ValueError) as info:
            model.weight("layers[3].attention.query")
        errors.append(str(info.value))
    assert errors[0] == errors[1]
