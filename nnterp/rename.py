"""Architecture naming: where each standardized component lives in a Hugging Face model.

Hugging Face families spell the same transformer differently (``model.layers`` vs
``transformer.h``, ``self_attn`` vs ``attn`` vs ``attention``, ``norm`` vs ``ln_f``).
A `ModulePaths` says, for one family, where the decoder layers, their attention and MLP,
the embedding, the final norm and the unembedding are, as dotted paths from the
``*ForCausalLM`` module. The standardized accessors resolve through it and never spell
a family's names themselves.

vLLM builds the same families as other module trees, and `paths_for` finds those too:
vLLM's own model of a family may unembed with its embedding module (Gemma 2 has no
``lm_head``) or scale the embeddings outside the embedding module (vLLM's Gemma
models, where Hugging Face's embedding module scales itself); a family vLLM runs
through its generic transformers back end (``TransformersForCausalLM``, e.g. GPT-NeoX
on vLLM 0.32) holds Hugging Face's base model at ``model`` and its own ``lm_head``.

Families not in `KNOWN_ARCHITECTURES` are tried against the common spellings; if none
fits, loading fails with an error listing what is missing and how to pass
``StandardizedTransformer(..., paths=ModulePaths(...))``.

The same tables say where each *weight* lives under a standardized name
(``"layers[3].attention.q"``, ``"unembedding"``): `weight_ref` turns a name into a
`WeightRef` (a module path, which of its tensors, and which part of a module that packs
several projections), and each backend reads that from its own module tree
(``Backend.weight``). vLLM packs and shards its modules differently; its backend maps a
`WeightRef` onto them (`nnterp.backends.weights`).

This module knows module names only; it imports neither nnsight nor a backend.
"""

from __future__ import annotations

import difflib
import re
from typing import Iterable, Iterator, Mapping

import attrs

from nnterp.sites import SiteKind

__all__ = ["ModulePaths", "KNOWN_ARCHITECTURES", "paths_for", "resolve_path", "missing_paths", "mapping_error_message",
           "WeightSource", "WeightRef", "LAYER_WEIGHTS", "weight_ref", "weight_refs", "unknown_weight_message"]


@attrs.frozen
class ModulePaths:
    """Where the standardized components live in one architecture.

    Paths are dotted attribute paths from the causal-LM module (``model.layers``);
    ``attention`` and ``mlp`` are relative to one decoder layer. ``final_norm`` may be
    ``None`` for a model without one; every other path is required. ``lm_head`` is the
    module whose weight unembeds: the embedding module itself where the model ties
    them without an ``lm_head`` module.

    Example:
        >>> ModulePaths(layers="transformer.h", attention="attn", mlp="mlp",
        ...             embeddings="transformer.wte", final_norm="transformer.ln_f",
        ...             lm_head="lm_head").layers
        'transformer.h'
    """

    layers: str
    attention: str
    mlp: str
    embeddings: str
    final_norm: str | None
    lm_head: str
    #: the MLP module sees the tokens flattened to ``[batch * seq, hidden]`` (OPT)
    mlp_flattens_tokens: bool = attrs.field(default=False, kw_only=True)
    #: path of a scalar by which the model multiplies the embedding module's output,
    #: outside that module (vLLM's Gemma models: ``model.normalizer``, sqrt(hidden_size));
    #: the ``embeddings_output`` site is that product, as on Hugging Face, whose Gemma
    #: embedding module scales its own output
    embeddings_multiplier: str | None = attrs.field(default=None, kw_only=True)
    #: the module, below a layer, whose output is what the attention adds to the residual
    #: stream, where that is not the attention module's own output: a norm the layer
    #: applies after it (Gemma 2 and 3, OLMo 2: ``post_attention_layernorm``)
    attention_output: str | None = attrs.field(default=None, kw_only=True)
    #: the same for the MLP (those families: ``post_feedforward_layernorm``)
    mlp_output: str | None = attrs.field(default=None, kw_only=True)

    def module_path(self, kind: SiteKind, layer: int | None = None) -> str:
        """The dotted path of the module whose output (or input) is a site of ``kind``.

        Attention probabilities are computed inside the attention module. Logits are the
        whole model's output, so they have no module path of their own.

        Example:
            >>> from nnterp.sites import SiteKind
            >>> KNOWN_ARCHITECTURES["gpt2"].module_path(SiteKind.MLPS_OUTPUT, 3)
            'transformer.h.3.mlp'
        """
        if kind is SiteKind.EMBEDDINGS_OUTPUT:
            return self.embeddings
        if kind is SiteKind.LOGITS:
            raise ValueError("logits are the model's own output; they have no module path")
        block = f"{self.layers}.{layer}"
        if kind is SiteKind.ATTENTION_PROBABILITIES:
            return f"{block}.{self.attention}"
        if kind is SiteKind.ATTENTIONS_OUTPUT:
            return f"{block}.{self.attention_output or self.attention}"
        if kind is SiteKind.MLPS_OUTPUT:
            return f"{block}.{self.mlp_output or self.mlp}"
        return block


_LLAMA_LIKE = ModulePaths(
    layers="model.layers",
    attention="self_attn",
    mlp="mlp",
    embeddings="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
)

# Layers that normalize what the attention and the MLP return before adding it to the
# residual stream: the sites are the norms' outputs, so that layers_input +
# attentions_output + mlps_output is layers_output, as in every other family.
_SANDWICH_NORMS = attrs.evolve(_LLAMA_LIKE, attention_output="post_attention_layernorm",
                               mlp_output="post_feedforward_layernorm")

#: model_type -> ModulePaths for every family nnterp is tested on.
KNOWN_ARCHITECTURES: Mapping[str, ModulePaths] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _SANDWICH_NORMS,
    "gemma3_text": _SANDWICH_NORMS,
    "phi3": _LLAMA_LIKE,
    "olmo2": _SANDWICH_NORMS,
    "gpt2": ModulePaths(
        layers="transformer.h",
        attention="attn",
        mlp="mlp",
        embeddings="transformer.wte",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
    ),
    "gpt_neox": ModulePaths(
        layers="gpt_neox.layers",
        attention="attention",
        mlp="mlp",
        embeddings="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",
    ),
    # OPT computes its MLP inline (fc1 -> activation -> fc2); fc2's output is exactly
    # the MLP's contribution to the residual stream.
    "opt": ModulePaths(
        layers="model.decoder.layers",
        attention="self_attn",
        mlp="fc2",
        embeddings="model.decoder.embed_tokens",
        final_norm="model.decoder.final_layer_norm",
        lm_head="lm_head",
        mlp_flattens_tokens=True,
    ),
}

#: The fields that are module paths, and those of them a model may lack.
_PATH_FIELDS = ("layers", "attention", "mlp", "embeddings", "final_norm", "lm_head", "embeddings_multiplier",
                "attention_output", "mlp_output")
_OPTIONAL = ("final_norm", "embeddings_multiplier", "attention_output", "mlp_output")
#: the fields that are paths below a layer
_IN_LAYER = ("attention", "mlp", "attention_output", "mlp_output")
#: Where the base model sits in vLLM's generic transformers back end
#: (``TransformersForCausalLM``): Hugging Face's ``AutoModel`` at ``model``.
_TRANSFORMERS_BACKEND_BASE = "model"
#: Other names of the unembedding module than a family's Hugging Face one (vLLM's own
#: GPT-NeoX calls it ``embed_out``).
_UNEMBEDDING_NAMES = ("lm_head", "embed_out")
#: vLLM's Gemma models multiply the embeddings by this buffer of their base model.
_EMBEDDINGS_MULTIPLIER_NAME = "normalizer"

# Spellings tried, in order, for a family that is not in the table.
_CANDIDATES = {
    "layers": ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers"),
    "attention": ("self_attn", "attn", "attention", "self_attention"),
    "mlp": ("mlp", "feed_forward", "ffn"),
    "embeddings": ("model.embed_tokens", "transformer.wte", "gpt_neox.embed_in", "model.decoder.embed_tokens", "transformer.word_embeddings"),
    "final_norm": ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm", "transformer.norm_f"),
    "lm_head": ("lm_head", "embed_out"),
}


def resolve_path(root, path: str):
    """Follow a dotted path of attributes (and integer indices) from ``root``.

    Returns ``None`` when any step is missing, so callers can collect every missing
    path before reporting them together.
    """
    node = root
    for part in path.split("."):
        if part.isdigit():
            try:
                node = node[int(part)]
            except (IndexError, TypeError, KeyError):
                return None
        else:
            node = getattr(node, part, None)
        if node is None:
            return None
    return node


def _first_present(root, candidates: Iterable[str]) -> str | None:
    for path in candidates:
        if resolve_path(root, path) is not None:
            return path
    return None


def paths_for(model_type: str, module) -> ModulePaths | None:
    """The paths of a known family as ``module`` spells them, or the common spellings
    that fit ``module``.

    A known family is looked up in the layouts its module tree takes (`_layouts`): the
    first whose every path resolves in ``module`` is returned, else the Hugging Face
    one, which `missing_paths` then reports against. Returns ``None`` when a required
    component of an unknown family has no known spelling in ``module``; `missing_paths`
    then says which.

    Example:
        >>> import torch
        >>> class Gemma2Model(torch.nn.Module):   # vLLM's: embeddings scaled outside,
        ...     def __init__(self):               # no lm_head (tied unembedding)
        ...         super().__init__()
        ...         self.embed_tokens = torch.nn.Embedding(10, 4)
        ...         self.layers = torch.nn.ModuleList([torch.nn.Module()])
        ...         self.layers[0].self_attn, self.layers[0].mlp = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        ...         self.layers[0].post_attention_layernorm = torch.nn.LayerNorm(4)  # what the layer adds
        ...         self.layers[0].post_feedforward_layernorm = torch.nn.LayerNorm(4)
        ...         self.norm = torch.nn.LayerNorm(4)
        ...         self.register_buffer("normalizer", torch.tensor(2.0))
        >>> root = torch.nn.Module()
        >>> root.model = Gemma2Model()
        >>> paths = paths_for("gemma2", root)
        >>> paths.lm_head, paths.embeddings_multiplier
        ('model.embed_tokens', 'model.normalizer')
    """
    if model_type in KNOWN_ARCHITECTURES:
        known = KNOWN_ARCHITECTURES[model_type]
        found = next((paths for paths in _layouts(known) if not missing_paths(module, paths)), None)
        return _with_embeddings_multiplier(module, found) if found is not None else known
    found = _guess(module)
    if any(found[key] is None for key in ("layers", "attention", "mlp", "embeddings", "lm_head")):
        return None
    return _with_embeddings_multiplier(module, ModulePaths(**found))


def _layouts(paths: ModulePaths) -> Iterator[ModulePaths]:
    """The module trees one family takes, most common first.

    Hugging Face's (which vLLM's own models of most families follow); vLLM's generic
    transformers back end, with the base model's paths rooted at ``model``; and for
    each, the unembedding under another name, or tied to the embedding module.
    """
    base = paths.layers.split(".", 1)[0]
    trees = [paths]
    if base != _TRANSFORMERS_BACKEND_BASE:
        trees.append(attrs.evolve(paths, **{key: _reroot(getattr(paths, key), base)
                                             for key in ("layers", "embeddings", "final_norm")}))
    for tree in trees:
        yield tree
        for name in _UNEMBEDDING_NAMES:
            if name != tree.lm_head:
                yield attrs.evolve(tree, lm_head=name)
        yield attrs.evolve(tree, lm_head=tree.embeddings)


def _reroot(path: str | None, base: str) -> str | None:
    """``path`` below the base model ``base`` (``transformer.h``), as a path below vLLM's
    transformers back end's base model (``model.h``)."""
    if path is None or not path.startswith(base + "."):
        return path
    return f"{_TRANSFORMERS_BACKEND_BASE}.{path[len(base) + 1:]}"


def _with_embeddings_multiplier(module, paths: ModulePaths) -> ModulePaths:
    """``paths`` with the scalar the model multiplies its embeddings by, where it has
    one outside the embedding module (vLLM's Gemma models)."""
    if paths.embeddings_multiplier is not None or "." not in paths.embeddings:
        return paths
    candidate = f"{paths.embeddings.rsplit('.', 1)[0]}.{_EMBEDDINGS_MULTIPLIER_NAME}"
    if resolve_path(module, candidate) is None:
        return paths
    return attrs.evolve(paths, embeddings_multiplier=candidate)


def _guess(module) -> dict:
    layers = _first_present(module, _CANDIDATES["layers"])
    first_layer = resolve_path(module, layers + ".0") if layers else None
    return {
        "layers": layers,
        "attention": _first_present(first_layer, _CANDIDATES["attention"]) if first_layer is not None else None,
        "mlp": _first_present(first_layer, _CANDIDATES["mlp"]) if first_layer is not None else None,
        "embeddings": _first_present(module, _CANDIDATES["embeddings"]),
        "final_norm": _first_present(module, _CANDIDATES["final_norm"]),
        "lm_head": _first_present(module, _CANDIDATES["lm_head"]),
    }


def missing_paths(module, paths: ModulePaths | None) -> list[str]:
    """Human-readable lines naming each component that does not resolve in ``module``."""
    problems = []
    guessed = _guess(module) if paths is None else None
    for key in _PATH_FIELDS:
        if paths is not None:
            path = getattr(paths, key)
            if path is None and key in _OPTIONAL:
                continue
            base = module
            if key in _IN_LAYER:
                base = resolve_path(module, f"{paths.layers}.0")
                if base is None:
                    continue  # reported under "layers"
            if path is None or resolve_path(base, path) is None:
                problems.append(f"{key}: no module at {path!r}")
        elif guessed.get(key) is None and key not in _OPTIONAL:
            problems.append(f"{key}: none of {', '.join(_CANDIDATES[key])} exists")
    return problems


def mapping_error_message(model_type: str, class_name: str, problems: list[str]) -> str:
    """The load-time error text: every problem, then how to pass a mapping."""
    lines = "\n".join(f"  - {p}" for p in problems)
    return (
        f"nnterp cannot map {class_name} (model_type {model_type!r}) onto its standardized names:\n"
        f"{lines}\n"
        f"Pass the module paths yourself, e.g. StandardizedTransformer(name, paths=ModulePaths("
        f"layers='model.layers', attention='self_attn', mlp='mlp', embeddings='model.embed_tokens', "
        f"final_norm='model.norm', lm_head='lm_head')), with the names printed by print(model); "
        f"where the layer applies a norm to what the attention or MLP returns before adding it, name "
        f"that norm too (attention_output='post_attention_layernorm', mlp_output=...). If the sites are "
        f"right and a check is wrong for this model, load it with check=False."
    )


# -- weights ---------------------------------------------------------------------------


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
