"""Weights by standardized name: where each lives in a family's module tree.

A standardized name (``"layers[3].attention.q"``, ``"unembedding"``) means the same
weight in every family. `weight_ref` turns a name into a `WeightRef` (a module path from
`nnterp.rename.ModulePaths`, which of its tensors, and which part of a module that packs
several projections), and each backend reads that from its own module tree
(``Backend.weight``). vLLM packs and shards its modules differently; its backend maps a
`WeightRef` onto them (`nnterp.backends.weights`).

This module knows module names only; it imports neither nnsight nor a backend.
"""

from __future__ import annotations

import difflib
import re
from typing import Mapping

import attrs

from nnterp.rename import KNOWN_ARCHITECTURES, ModulePaths  # noqa: F401 - the doctests use KNOWN_ARCHITECTURES

__all__ = ["WeightSource", "WeightRef", "LAYER_WEIGHTS", "weight_ref", "weight_refs", "unknown_weight_message"]


@attrs.frozen
class WeightSource:
    """Where one standardized per-layer weight lives in a Hugging Face model of a family.

    ``module`` is a dotted path from one decoder layer. Some modules compute several
    projections in one matmul and stack their weights along the output; ``packing``
    says how, and ``part`` which of them this weight is (counting from 0):

    - ``"qkv"``: q, k and v one after the other, ``[heads * head_dim; kv_heads * head_dim;
      kv_heads * head_dim]`` rows (Phi-3's ``qkv_proj``, GPT-2's ``c_attn``);
    - ``"halves"``: two equal halves (Phi-3's ``gate_up_proj``: gate, then up);
    - ``"qkv_per_head"``: head after head, each head's q, k and v rows (GPT-NeoX's
      ``query_key_value``).

    Example:
        >>> LAYER_WEIGHT_SOURCES["gpt2"]["attention.k"]
        WeightSource(module='attn.c_attn', packing='qkv', part=1)
    """

    module: str
    packing: str | None = None
    part: int = 0


@attrs.frozen
class WeightRef:
    """One standardized weight, located: the module (a dotted path from the causal-LM
    module, in the module tree `ModulePaths` describes), which of its tensors
    (``"weight"`` or ``"bias"``), and for a packed module which part (see `WeightSource`).

    A backend reads it from its own tree; vLLM's backend first finds where vLLM packed or
    split that module (`nnterp.backends.weights`).
    """

    name: str
    module: str
    tensor: str = "weight"
    packing: str | None = None
    part: int = 0


#: The per-layer weights, in the order a forward pass uses them, each the weight of one
#: module (``<name>.bias`` is that module's bias, where it has one):
#: ``attention_norm`` normalises the attention's input; ``attention.q``/``k``/``v``/``o``
#: are its projections and ``attention.q_norm``/``k_norm`` the norms of queries and keys
#: (Qwen 3, Gemma 3, OLMo 2); ``attention_output_norm`` normalises what the attention adds
#: (Gemma 2 and 3, OLMo 2); ``mlp_norm`` normalises the MLP's input; ``mlp.gate``, ``up``
#: and ``down`` are its projections (no gate in GPT-2, GPT-NeoX and OPT: ``up`` is their
#: first projection); ``mlp_output_norm`` normalises what the MLP adds.
LAYER_WEIGHTS = ("attention_norm", "attention.q", "attention.k", "attention.v", "attention.q_norm",
                 "attention.k_norm", "attention.o", "attention_output_norm", "mlp_norm", "mlp.gate", "mlp.up",
                 "mlp.down", "mlp_output_norm")
#: The whole-model weights before the layers (the token embedding, and learned absolute
#: positions where the model has them) and after them.
_INPUT_WEIGHTS = ("embedding", "position_embedding")
_OUTPUT_WEIGHTS = ("final_norm", "unembedding")

_LLAMA_WEIGHTS = {
    "attention_norm": WeightSource("input_layernorm"),
    "attention.q": WeightSource("self_attn.q_proj"),
    "attention.k": WeightSource("self_attn.k_proj"),
    "attention.v": WeightSource("self_attn.v_proj"),
    "attention.q_norm": WeightSource("self_attn.q_norm"),
    "attention.k_norm": WeightSource("self_attn.k_norm"),
    "attention.o": WeightSource("self_attn.o_proj"),
    "mlp_norm": WeightSource("post_attention_layernorm"),
    "mlp.gate": WeightSource("mlp.gate_proj"),
    "mlp.up": WeightSource("mlp.up_proj"),
    "mlp.down": WeightSource("mlp.down_proj"),
}
# Gemma 2 and 3 normalise both sides of each block: their post_attention_layernorm is
# the attention's output norm, not (as in Llama) the MLP's input norm.
_GEMMA2_WEIGHTS = {
    **{role: source for role, source in _LLAMA_WEIGHTS.items() if role != "mlp_norm"},
    "attention_output_norm": WeightSource("post_attention_layernorm"),
    "mlp_norm": WeightSource("pre_feedforward_layernorm"),
    "mlp_output_norm": WeightSource("post_feedforward_layernorm"),
}
# OLMo 2 normalises only what each block adds.
_OLMO2_WEIGHTS = {
    **{role: source for role, source in _LLAMA_WEIGHTS.items() if role not in ("attention_norm", "mlp_norm")},
    "attention_output_norm": WeightSource("post_attention_layernorm"),
    "mlp_output_norm": WeightSource("post_feedforward_layernorm"),
}
_PHI3_WEIGHTS = {
    **_LLAMA_WEIGHTS,
    **{f"attention.{name}": WeightSource("self_attn.qkv_proj", "qkv", part) for part, name in enumerate("qkv")},
    "mlp.gate": WeightSource("mlp.gate_up_proj", "halves", 0),
    "mlp.up": WeightSource("mlp.gate_up_proj", "halves", 1),
}

#: model_type -> {per-layer weight name: where it lives} for every family nnterp maps.
LAYER_WEIGHT_SOURCES: Mapping[str, Mapping[str, WeightSource]] = {
    "llama": _LLAMA_WEIGHTS,
    "mistral": _LLAMA_WEIGHTS,
    "qwen2": _LLAMA_WEIGHTS,
    "qwen3": _LLAMA_WEIGHTS,
    "gemma": _LLAMA_WEIGHTS,
    "gemma2": _GEMMA2_WEIGHTS,
    "gemma3_text": _GEMMA2_WEIGHTS,
    "phi3": _PHI3_WEIGHTS,
    "olmo2": _OLMO2_WEIGHTS,
    "gpt2": {
        "attention_norm": WeightSource("ln_1"),
        **{f"attention.{name}": WeightSource("attn.c_attn", "qkv", part) for part, name in enumerate("qkv")},
        "attention.o": WeightSource("attn.c_proj"),
        "mlp_norm": WeightSource("ln_2"),
        "mlp.up": WeightSource("mlp.c_fc"),
        "mlp.down": WeightSource("mlp.c_proj"),
    },
    "gpt_neox": {
        "attention_norm": WeightSource("input_layernorm"),
        **{f"attention.{name}": WeightSource("attention.query_key_value", "qkv_per_head", part)
           for part, name in enumerate("qkv")},
        "attention.o": WeightSource("attention.dense"),
        "mlp_norm": WeightSource("post_attention_layernorm"),
        "mlp.up": WeightSource("mlp.dense_h_to_4h"),
        "mlp.down": WeightSource("mlp.dense_4h_to_h"),
    },
    "opt": {
        "attention_norm": WeightSource("self_attn_layer_norm"),
        **{f"attention.{name}": WeightSource(f"self_attn.{name}_proj") for name in "qkv"},
        "attention.o": WeightSource("self_attn.out_proj"),
        "mlp_norm": WeightSource("final_layer_norm"),
        "mlp.up": WeightSource("fc1"),
        "mlp.down": WeightSource("fc2"),
    },
}
#: model_type -> the learned position embedding's name, beside the token embedding.
_POSITION_EMBEDDINGS = {"gpt2": "wpe", "opt": "embed_positions"}

_LAYER_NAME = re.compile(r"layers\[(-?\d+)\]\.(.+)")


def _split_tensor(name: str) -> tuple[str, str]:
    """``("layers[3].attention.q", "bias")`` from ``"layers[3].attention.q.bias"``."""
    return (name[: -len(".bias")], "bias") if name.endswith(".bias") else (name, "weight")


def _model_weight_module(name: str, paths: ModulePaths, model_type: str) -> str | None:
    """The module holding a whole-model weight, or None where this model has none."""
    if name == "embedding":
        return paths.embeddings
    if name == "unembedding":
        return paths.lm_head
    if name == "final_norm":
        return paths.final_norm
    if name == "position_embedding" and model_type in _POSITION_EMBEDDINGS:
        parent = paths.embeddings.rpartition(".")[0]
        return f"{parent}.{_POSITION_EMBEDDINGS[model_type]}" if parent else _POSITION_EMBEDDINGS[model_type]
    return None


def weight_ref(name: str, paths: ModulePaths, model_type: str, num_layers: int) -> WeightRef | None:
    """Where the weight called ``name`` lives in a model laid out as ``paths`` says.

    A negative layer index counts from the last layer, as the accessors' do; the
    returned ref carries the name with the index made positive.

    Returns:
        The `WeightRef`, or None when ``name`` is not a standardized weight name, or is
        one this family has no module for (GPT-2's ``mlp.gate``). Whether the module
        actually has the tensor (a bias) is the backend's to check.

    Raises:
        IndexError: the layer index is out of range.
        NotImplementedError: a per-layer weight of a family whose layers nnterp does not
            map (`LAYER_WEIGHT_SOURCES`).

    Example:
        >>> weight_ref("layers[-1].attention.q.bias", KNOWN_ARCHITECTURES["gpt2"], "gpt2", 12)
        WeightRef(name='layers[11].attention.q.bias', module='transformer.h.11.attn.c_attn', tensor='bias', packing='qkv', part=0)
        >>> weight_ref("unembedding", KNOWN_ARCHITECTURES["llama"], "llama", 30).module
        'lm_head'
    """
    base, tensor = _split_tensor(name)
    match = _LAYER_NAME.fullmatch(base)
    if match is None:
        if base not in _INPUT_WEIGHTS + _OUTPUT_WEIGHTS:
            return None
        module = _model_weight_module(base, paths, model_type)
        return None if module is None else WeightRef(name, module, tensor)
    layer, role = int(match.group(1)), match.group(2)
    if role not in LAYER_WEIGHTS:
        return None
    if not -num_layers <= layer < num_layers:
        raise IndexError(f"{name}: this model has {num_layers} layers (valid: {-num_layers}..{num_layers - 1})")
    sources = LAYER_WEIGHT_SOURCES.get(model_type)
    if sources is None:
        raise NotImplementedError(
            f"{name}: nnterp does not know where {model_type!r} models keep their per-layer weights (it maps "
            f"{', '.join(LAYER_WEIGHT_SOURCES)}); the whole-model weights ({', '.join(_INPUT_WEIGHTS + _OUTPUT_WEIGHTS)}) "
            f"are available, and on the HF backend model.nnsight_model's parameters hold the rest")
    source = sources.get(role)
    if source is None:
        return None
    layer %= num_layers
    suffix = ".bias" if tensor == "bias" else ""
    return WeightRef(f"layers[{layer}].{role}{suffix}", f"{paths.layers}.{layer}.{source.module}", tensor,
                     source.packing, source.part)


def weight_refs(paths: ModulePaths, model_type: str, num_layers: int) -> list[WeightRef]:
    """Every weight a model of this family may have, weight then bias, in forward order:
    the embeddings, each layer's weights, the final norm and the unembedding. The backend
    keeps those its model has (``Backend.weight_names``).

    Example:
        >>> [ref.name for ref in weight_refs(KNOWN_ARCHITECTURES["llama"], "llama", 1)][:5]
        ['embedding', 'embedding.bias', 'layers[0].attention_norm', 'layers[0].attention_norm.bias', 'layers[0].attention.q']
    """
    roles = [f"layers[{layer}].{role}" for layer in range(num_layers)
             for role in LAYER_WEIGHTS if role in LAYER_WEIGHT_SOURCES.get(model_type, {})]
    refs = []
    for base in (*_INPUT_WEIGHTS, *roles, *_OUTPUT_WEIGHTS):
        for name in (base, f"{base}.bias"):
            ref = weight_ref(name, paths, model_type, num_layers)
            if ref is not None:
                refs.append(ref)
    return refs


def _is_standard_name(name: str) -> bool:
    base, _ = _split_tensor(name)
    match = _LAYER_NAME.fullmatch(base)
    return base in _INPUT_WEIGHTS + _OUTPUT_WEIGHTS if match is None else match.group(2) in LAYER_WEIGHTS


def unknown_weight_message(name: str, names: list[str], model_type: str) -> str:
    """The error for a weight name this model does not have: the closest name (for a
    misspelling), and this model's names, the per-layer ones once for all layers.

    Example:
        >>> print(unknown_weight_message("layers[0].attention.query", ["embedding", "layers[0].attention.q",
        ...       "layers[0].attention.k", "layers[1].attention.q", "layers[1].attention.k"], "llama"))
        'layers[0].attention.query' is not a standardized weight name; did you mean 'layers[0].attention.q'? This llama model's weights: embedding, and for each layer i in 0..1: layers[i].{attention.q, attention.k} (model.weight_names() lists all 5).
    """
    if _is_standard_name(name):
        what = f"this {model_type} model has no weight {name!r}."
    else:
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        what = f"{name!r} is not a standardized weight name" + (f"; did you mean {close[0]!r}?" if close else ".")
    whole = [n for n in names if not n.startswith("layers[")]
    roles = [n.split(".", 1)[1] for n in names if n.startswith("layers[0].")]
    layers = {n.split("]", 1)[0] for n in names if n.startswith("layers[")}
    listing = ", ".join(whole)
    if roles:
        listing += f", and for each layer i in 0..{len(layers) - 1}: layers[i].{{{', '.join(roles)}}}"
    return f"{what} This {model_type} model's weights: {listing} (model.weight_names() lists all {len(names)})."
