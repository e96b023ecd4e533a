"""Tiny random-weight models of every supported family, built offline from configs.

Each model is saved as an ordinary Hugging Face folder with the bundled model's
tokenizer: transformers 5 picks the tokenizer class from the model type, and a toy
tokenizer can silently tokenize everything to nothing, so a real one is reused.
Sizes keep head_dim = 32, which vLLM's CPU attention supports.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

VOCAB = 49152  # the bundled tokenizer's vocabulary
_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)
_LLAMA_LIKE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512, **_IDS,
)


def _configs() -> dict:
    return {
        "llama": transformers.LlamaConfig(**_LLAMA_LIKE),
        "mistral": transformers.MistralConfig(**_LLAMA_LIKE, sliding_window=None),
        "qwen2": transformers.Qwen2Config(**_LLAMA_LIKE),
        "qwen3": transformers.Qwen3Config(**_LLAMA_LIKE),
        "gemma2": transformers.Gemma2Config(**_LLAMA_LIKE, query_pre_attn_scalar=32, sliding_window=4,
                                            final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
        "gemma3": transformers.Gemma3TextConfig(**_LLAMA_LIKE, query_pre_attn_scalar=32, sliding_window=4),
        "phi3": transformers.Phi3Config(**{k: v for k, v in _LLAMA_LIKE.items() if k != "head_dim"}),
        "gpt2": transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=2, n_positions=512, **_IDS),
        "gpt_neox": transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=3, num_attention_heads=2,
                                               max_position_embeddings=512, **_IDS),
        "opt": transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=3,
                                      num_attention_heads=2, word_embed_proj_dim=64, max_position_embeddings=512,
                                      **_IDS),
    }


FAMILIES = tuple(_configs())


def build(family: str, folder: Path, tokenizer_folder: Path, seed: int = 0, config=None, **overrides) -> Path:
    """Write a random-weight model of ``family`` to ``folder`` (once) and return it.

    ``config``: the configuration of a family outside `FAMILIES`; ``overrides`` change
    the family's configuration (``vocab_size=...``)."""
    if (folder / "config.json").exists():
        return folder
    config = config if config is not None else _configs()[family]
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves norms at exactly 1 and biases at 0; perturb everything so a
    # wrong norm or a skipped bias shows up as a difference.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tokenizer_folder).save_pretrained(folder)
    return folder
