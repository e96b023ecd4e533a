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

Where each *weight* lives under a standardized name is `nnterp.weight_map`, built on
these paths.

This module knows module names only; it imports neither nnsight nor a backend.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping

import attrs

from nnterp.sites import SiteKind

__all__ = ["ModulePaths", "KNOWN_ARCHITECTURES", "paths_for", "resolve_path", "missing_paths", "mapping_error_message"]


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
