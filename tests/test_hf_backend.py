"""StandardizedTransformer on the HF backend, on a tiny model of every family and on SmolLM2.

Tolerances follow from float32 (eps = 2**-23 ≈ 1.19e-7): the same modules running the
same kernels on the same input agree exactly; a computation that only reorders float32
accumulations (another batch shape) agrees to rounding noise relative to each token's
scale; a softmax over n terms sums to 1 within (n + 1)·eps.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from nnterp import ArchitectureNotSupportedError, ModulePaths, StandardizedTransformer
from nnterp.rename import KNOWN_ARCHITECTURES, resolve_path
from test_vllm_backend import assert_close_per_token
from tiny_models import FAMILIES

PROMPTS = ["The capital of France is", "Hello"]
ALL = list(FAMILIES) + ["bundled"]
EPS = torch.finfo(torch.float32).eps
#: a batch of another shape reorders float32 accumulations in every matmul; the values
#: then differ by rounding noise relative to their token's largest value, measured at
#: most 25 eps (SmolLM2's logits, after 30 layers; 7 eps on the tiny models): 2**7 eps
#: leaves a 5x margin, and padding leaking into attention would be off by far more
REORDERED = 2**7 * EPS


def paths_of(model):
    return KNOWN_ARCHITECTURES[model.config.model_type]


def _plain_reference(path, prompt: str):
    """Module outputs of a plain transformers model (no nnsight), via forward hooks."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    paths = KNOWN_ARCHITECTURES[model.config.model_type]
    layers = resolve_path(model, paths.layers)
    captured = {}

    def hook(key):
        def save(_module, _args, output):
            captured[key] = (output[0] if isinstance(output, tuple) else output).detach().clone()
        return save

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(hook(("layers", i))))
        # what the attention and the MLP add to the residual stream: their modules' outputs,
        # or the norms applied after them (Gemma 2 and 3)
        handles.append(resolve_path(layer, paths.attention_output or paths.attention)
                       .register_forward_hook(hook(("attentions", i))))
        handles.append(resolve_path(layer, paths.mlp_output or paths.mlp).register_forward_hook(hook(("mlps", i))))
    with torch.no_grad():
        captured["logits"] = model(**tokenizer(prompt, return_tensors="pt")).logits
    for handle in handles:
        handle.remove()
    return captured


@pytest.mark.parametrize("family", ALL)
def test_accessors_equal_raw_module_outputs(family, hf_models, tiny_dir, bundled_path):
    model = hf_models(family)
    path = bundled_path if family == "bundled" else tiny_dir(family)
    ref = _plain_reference(path, PROMPTS[0])
    got = {}
    with torch.no_grad(), model.trace(PROMPTS[0]):
        for i in range(model.num_layers):
            got[("attentions", i)] = model.attentions_output[i].save()
            got[("mlps", i)] = model.mlps_output[i].save()
            got[("layers", i)] = model.layers_output[i].save()
        got["logits"] = model.logits.save()
    for key, value in ref.items():
        if key[0] == "mlps" and paths_of(model).mlp_flattens_tokens:
            value = value.view(got[key].shape)  # the raw module sees [batch * seq, hidden]
        assert got[key].shape == value.shape, key
        # the same modules, kernels and input as the plain model: exact
        torch.testing.assert_close(got[key], value, atol=0, rtol=0, msg=f"{family} {key}")
    assert got[("layers", 0)].shape == (1, len(model.tokenizer(PROMPTS[0])["input_ids"]), model.hidden_size)


@pytest.mark.parametrize("family", ALL)
def test_last_layer_through_project_on_vocab_is_logits(family, hf_models):
    model = hf_models(family)
    with torch.no_grad(), model.trace(PROMPTS):
        last = model.layers_output[-1].save()
        inside = model.project_on_vocab(model.layers_output[-1]).save()
        logits = model.logits.save()
    # the model's own final norm and unembedding, on the same tensor: exact
    torch.testing.assert_close(model.project_on_vocab(last), logits, atol=0, rtol=0)
    torch.testing.assert_close(inside, logits, atol=0, rtol=0)


@pytest.mark.parametrize("family", ALL)
def test_layers_input_is_previous_layers_output(family, hf_models):
    model = hf_models(family)
    with torch.no_grad(), model.trace(PROMPTS[0]):
        out0 = model.layers_output[0].save()
        in1 = model.layers_input[1].save()
    torch.testing.assert_close(in1, out0, atol=0, rtol=0)  # one tensor, read at two sites: exact


@pytest.mark.parametrize("family", ALL)
def test_attention_probabilities_sum_to_one_and_edits_change_output(family, hf_models):
    model = hf_models(family, enable_attention_probs=True)
    with torch.no_grad(), model.trace(PROMPTS[0]):
        probs = model.attention_probabilities[0].save()
        clean = model.logits.save()
    n = len(model.tokenizer(PROMPTS[0])["input_ids"])
    assert probs.shape == (1, model.num_heads, n, n)
    # a softmax over n keys, then a sum of its n terms: (n - 1)·eps/2 for each sum, and
    # 1.5 eps for exp and the division, so within (n + 1)·eps (as for the vocabulary below)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, model.num_heads, n),
                               atol=(n + 1) * torch.finfo(probs.dtype).eps, rtol=0)
    # causal: nothing above the diagonal
    assert torch.all(probs.triu(1) == 0)
    with torch.no_grad(), model.trace(PROMPTS[0]):
        current = model.attention_probabilities[0]
        uniform = torch.tril(torch.ones_like(current))
        model.attention_probabilities[0] = uniform / uniform.sum(-1, keepdim=True)
        edited = model.logits.save()
    assert (edited - clean).abs().max() > 1e-4  # an unedited pass would differ by exactly 0


def test_a_bfloat16_model_loads_with_attention_probabilities(hf_models):
    # each probability is rounded to bfloat16, so rows sum to 1 only within its rounding:
    # the load-time check refused such a model as one nnterp "cannot map"
    model = hf_models("llama", enable_attention_probs=True, dtype=torch.bfloat16)
    with torch.no_grad(), model.trace(PROMPTS[0]):
        probs = model.attention_probabilities[1].save()
    assert probs.dtype == torch.bfloat16
    n = probs.shape[-1]
    torch.testing.assert_close(probs.float().sum(-1), torch.ones(1, model.num_heads, n), atol=2**-7, rtol=0)


@pytest.mark.parametrize("family", ALL)
def test_left_padded_batch_matches_each_prompt_alone(family, hf_models):
    model = hf_models(family)
    prompts = ["The capital of France is the city of", "Hi", "One two three"]
    with torch.no_grad(), model.trace(prompts):
        batch_mid = model.layers_output[1][:, -1].save()
        batch_logits = model.logits[:, -1].save()
    for i, prompt in enumerate(prompts):
        with torch.no_grad(), model.trace(prompt):
            alone_mid = model.layers_output[1][:, -1].save()
            alone_logits = model.logits[:, -1].save()
        assert_close_per_token(batch_logits[i], alone_logits[0], f"{family} {prompt!r} logits", atol=0,
                               token_rtol=REORDERED)
        assert_close_per_token(batch_mid[i], alone_mid[0], f"{family} {prompt!r} layer 1", atol=0,
                               token_rtol=REORDERED)


@pytest.mark.parametrize("family", ALL)
def test_writing_a_layer_output_changes_later_layers_only(family, hf_models):
    model = hf_models(family)
    target = 1

    def run(edit: bool):
        outs = []
        with torch.no_grad(), model.trace(PROMPTS[0]):
            for i in range(model.num_layers):
                if edit and i == target:
                    model.layers_output[i] = model.layers_output[i] + 3.0
                outs.append(model.layers_output[i].save())
        return outs

    clean, edited = run(False), run(True)
    for i in range(model.num_layers):
        if i < target:
            torch.testing.assert_close(edited[i], clean[i], atol=0, rtol=0)  # the same pass so far: exact
        else:
            # +3 on every feature moves each later layer by O(1), far above the exact 0 of
            # an unedited layer
            assert (edited[i] - clean[i]).abs().max() > 1e-3, f"layer {i} unchanged"
    torch.testing.assert_close(edited[target], clean[target] + 3.0, atol=0, rtol=0)  # the same addition


def test_in_place_edit_acts_on_the_model(hf_models):
    model = hf_models("llama")
    with torch.no_grad(), model.trace(PROMPTS[0]):
        clean = model.logits.save()
    with torch.no_grad(), model.trace(PROMPTS[0]):
        model.layers_output[1][:] = 0
        zeroed_next_input = model.layers_input[2].save()
        edited = model.logits.save()
    assert torch.all(zeroed_next_input == 0)
    assert (edited - clean).abs().max() > 1e-4  # an unedited pass would differ by exactly 0


def test_write_attention_and_mlp_outputs(hf_models):
    model = hf_models("gpt2")
    with torch.no_grad(), model.trace(PROMPTS[0]):
        embeddings_plus_positions = model.layers_input[0].save()
        model.attentions_output[0] = torch.zeros_like(model.attentions_output[0])
        model.mlps_output[0] = torch.zeros_like(model.mlps_output[0])
        residual = model.layers_output[0].save()
    # with both sublayers zeroed, layer 0 passes its input through unchanged: x + 0 is x
    torch.testing.assert_close(residual, embeddings_plus_positions, atol=0, rtol=0)


def test_bundled_model_predicts_paris(hf_models):
    model = hf_models("bundled")
    with torch.no_grad(), model.trace("The capital of France is"):
        probs = model.next_token_probs.save()
    assert model.tokenizer.decode(probs[0].argmax()) == " Paris"
    assert probs.shape == (1, model.vocab_size)
    # V = 49,152 float32 terms, summed twice (the softmax's normaliser, then here): each
    # sum is within (V - 1)·eps/2 of exact, and exp (1 ulp) and the division add 1.5 eps,
    # so (V + 1)·eps ≈ 5.9e-3. This worst case holds in any order the CPU's kernels add
    # in; the tighter sqrt(V)·eps estimate assumes independent roundings, which adding
    # tens of thousands of tiny probabilities to a partial sum near 1 is not.
    # Measured: 1.3e-5 here, 2.0e-5 on another x86 machine.
    torch.testing.assert_close(probs.sum(-1), torch.ones(1), atol=(probs.shape[-1] + 1) * EPS, rtol=0)
    assert (model.num_layers, model.hidden_size, model.num_heads, model.vocab_size) == (30, 576, 9, 49152)
    assert model.backend == "hf" and model.is_vllm is False


def test_next_token_probs_write_changes_the_prediction(hf_models):
    model = hf_models("bundled")
    target = model.tokenizer(" London")["input_ids"][0]
    with torch.no_grad(), model.generate("The capital of France is", max_tokens=1) as tracer:
        probs = torch.zeros(1, model.vocab_size)
        probs[0, target] = 1.0
        model.next_token_probs = probs
        tokens = tracer.result.save()
    assert tokens[0, -1].item() == target


def test_layer_index_out_of_range_is_a_clear_error(hf_models):
    model = hf_models("llama")
    with pytest.raises(IndexError, match="3 layers"):
        with model.trace("hi"):
            model.layers_output[3].save()


def test_unmappable_architecture_fails_at_load_naming_what_is_missing(tiny_dir):
    with pytest.raises(ArchitectureNotSupportedError) as info:
        StandardizedTransformer(tiny_dir("llama"), paths=ModulePaths(
            layers="model.blocks", attention="self_attn", mlp="mlp", embeddings="model.embed_tokens",
            final_norm="model.norm", lm_head="lm_head"))
    message = str(info.value)
    assert "layers: no module at 'model.blocks'" in message
    assert "ModulePaths(" in message


def test_paths_pointing_at_the_wrong_module_fail_the_shape_check(tiny_dir):
    # q_proj exists but is not the attention output: the load-time probe catches the
    # wrong width (q_proj maps 64 -> heads * head_dim = 64, so use k_proj: 64 -> 32)
    with pytest.raises(ArchitectureNotSupportedError, match=r"attentions_output\[0\]: expected a tensor \[1, \d+, 64\]"):
        StandardizedTransformer(tiny_dir("llama"), paths=ModulePaths(
            layers="model.layers", attention="self_attn.k_proj", mlp="mlp", embeddings="model.embed_tokens",
            final_norm="model.norm", lm_head="lm_head"))


def test_trace_with_several_tokens_points_to_generate(hf_models):
    model = hf_models("llama")
    with pytest.raises(ValueError, match="model.generate"):
        model.trace("hi", max_tokens=5)


def test_greedy_generation_matches_transformers(hf_models, tiny_dir):
    model = hf_models("qwen2")
    with torch.no_grad(), model.generate("The capital of France is", max_tokens=6) as tracer:
        ids = tracer.result.save()
    plain = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir("qwen2"), dtype=torch.float32)
    enc = model.tokenizer("The capital of France is", return_tensors="pt")
    want = plain.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=2)
    assert ids.tolist() == want.tolist()
