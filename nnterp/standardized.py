"""`StandardizedTransformer`: one set of names over many architectures and two backends.

The facade holds a `Backend` (``nnterp.backends.hf.HFBackend`` or
``nnterp.backends.vllm.VLLMBackend``) and exposes its sites under standardized names:
``layers_output[i]`` is the residual stream after decoder layer ``i`` whether the model
calls its layers ``model.layers`` or ``transformer.h``, and whether it runs on
transformers or on vLLM. Accessors are views: indexing one inside a trace asks the
backend to read the site, and assigning to it asks the backend to write it.

Anything not defined here falls through to the underlying nnsight model, so raw nnsight
code (``model.model.layers[0].output``) keeps working on the same object.

This module never imports ``nnterp.dsl``: the DSL builds on models, not the reverse.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from nnterp.backends import Backend, open_backend
from nnterp.backends.internals import is_interleaving
from nnterp.limits import BACKENDS, DEFAULT_BACKEND, VLLM
from nnterp.bundled import find_loadable, resolve_model_name
from nnterp.errors import renamed_argument
from nnterp.rename import ModulePaths
from nnterp.sites import SiteKind

__all__ = ["StandardizedTransformer"]


class _LayerAccessor:
    """``accessor[i]`` reads a per-layer site; ``accessor[i] = v`` writes it.

    Negative indices count from the last layer, as in Python sequences; an index out of
    range is an ``IndexError`` that names the valid range, raised before nnsight sees it.
    """

    __slots__ = ("_owner", "_kind")

    def __init__(self, owner: "StandardizedTransformer", kind: SiteKind) -> None:
        self._owner = owner
        self._kind = kind

    def _index(self, layer: int) -> int:
        n = self._owner.num_layers
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"{self._kind.value}[...] takes a layer index (int), got {type(layer).__name__}")
        if not -n <= layer < n:
            raise IndexError(f"{self._kind.value}[{layer}]: this model has {n} layers (valid: {-n}..{n - 1})")
        return layer % n

    def __getitem__(self, layer: int) -> Any:
        return self._owner._backend.read(self._kind, self._index(layer))

    def __setitem__(self, layer: int, value: Any) -> None:
        self._owner._backend.write(self._kind, self._index(layer), value)

    def __len__(self) -> int:
        return self._owner.num_layers

    def __repr__(self) -> str:
        return f"<{self._kind.value}: {self._owner.num_layers} layers>"


class StandardizedTransformer:
    """A causal language model with standardized accessors, on the HF or vLLM backend.

    Args:
        name_or_path: a model folder, a hub id, or ``"bundled"`` (SmolLM2-135M-Instruct).
        backend: ``"hf"`` (nnsight ``TransformersModel``) or ``"vllm"`` (nnsight ``VLLM``).
        use_vllm: alias of ``backend="vllm"``.
        enable_attention_probs: HF only: load with eager attention so
            ``attention_probabilities[i]`` can be read and written.
        paths: a `ModulePaths` for an architecture nnterp does not map itself.
        quiet: silence the libraries' log lines and progress bars (vLLM's engine start-up,
            about 50 lines and a loading bar; transformers' bars), as the command line does;
            errors still show (`nnterp.quiet`). The loggers stay quiet for the rest of the
            process.
        **kwargs: passed to the backend: ``from_pretrained`` for HF, the engine for vLLM
            (``dtype``, ``max_model_len``, ``tensor_parallel_size``, ...). vLLM also takes
            ``cuda_graphs=True`` (or a list of site names): replay CUDA graphs, serving
            only those sites, and ``nvlink_multicast=False`` for hosts where NVLink
            multicast must not be used (see `nnterp.backends.vllm.VLLMBackend`).

    Example:
        >>> model = StandardizedTransformer("bundled")                 # doctest: +SKIP
        >>> with model.trace("The capital of France is"):              # doctest: +SKIP
        ...     h = model.layers_output[10].save()
        ...     probs = model.next_token_probs.save()
    """

    def __init__(
        self,
        name_or_path: str | os.PathLike,
        backend: str | None = None,
        *,
        use_vllm: bool = False,
        enable_attention_probs: bool = False,
        paths: ModulePaths | None = None,
        **kwargs: Any,
    ) -> None:
        backend = _choose_backend(backend, use_vllm)
        self.name_or_path = os.fspath(name_or_path)
        self._backend: Backend = open_backend(
            backend, find_loadable(name_or_path, cache_dir=kwargs.get("cache_dir") or kwargs.get("download_dir"),
                                   revision=kwargs.get("revision"),
                                   local_files_only=bool(kwargs.get("local_files_only"))), paths=paths,
            enable_attention_probs=enable_attention_probs, **kwargs)
        self.layers_input = _LayerAccessor(self, SiteKind.LAYERS_INPUT)
        self.layers_output = _LayerAccessor(self, SiteKind.LAYERS_OUTPUT)
        self.attentions_output = _LayerAccessor(self, SiteKind.ATTENTIONS_OUTPUT)
        self.mlps_output = _LayerAccessor(self, SiteKind.MLPS_OUTPUT)
        self.attention_probabilities = _LayerAccessor(self, SiteKind.ATTENTION_PROBABILITIES)

    # -- what the model is -------------------------------------------------------------

    @property
    def backend(self) -> str:
        """``"hf"`` or ``"vllm"``."""
        return self._backend.name

    @property
    def is_vllm(self) -> bool:
        return self._backend.limits is VLLM

    @property
    def attention_probs_enabled(self) -> bool:
        """Whether ``attention_probabilities[i]`` can be read (HF with
        ``enable_attention_probs=True``)."""
        return self._backend.attention_probs_enabled

    @property
    def max_model_len(self) -> int | None:
        """The most tokens, prompt plus generated, a sequence may hold on this backend
        (the vLLM engine's ``max_model_len``), or None where the backend sets no limit."""
        return self._backend.max_model_len

    @property
    def served_sites(self) -> frozenset[SiteKind] | None:
        """The site kinds a graph may touch on this model: those a CUDA-graph engine
        hooked (``cuda_graphs=[...]``), or None for every site."""
        return self._backend.served_sites

    @property
    def vector_rows(self) -> int | None:
        """How many edit vectors a plan may use at once (vLLM's batched executor), or None."""
        return self._backend.vector_rows

    @property
    def config(self):
        return self._backend.config

    @property
    def tokenizer(self):
        return self._backend.tokenizer

    @property
    def num_layers(self) -> int:
        return self._backend.num_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def identity(self) -> dict[str, Any]:
        """What identifies this model for reproducibility: the name it was loaded by, a
        sha256 of its configuration, and a sha256 of its weight files' names and sizes
        (plus the shard index, where there is one) when it was loaded from a folder.

        A run manifest records this; replaying compares it, so a colleague re-running
        with different weights under the same name is told so.
        """
        return model_identity(self.name_or_path, self.config)

    @property
    def nnsight_model(self):
        """The underlying nnsight model, for code that needs raw module paths."""
        return self._backend.model

    # -- whole-model sites -------------------------------------------------------------

    @property
    def embeddings_output(self) -> Any:
        return self._backend.read(SiteKind.EMBEDDINGS_OUTPUT, None)

    @embeddings_output.setter
    def embeddings_output(self, value: Any) -> None:
        self._backend.write(SiteKind.EMBEDDINGS_OUTPUT, None, value)

    @property
    def logits(self) -> Any:
        """The model's output logits (``[batch, seq, vocab]``) inside a trace."""
        return self._backend.read(SiteKind.LOGITS, None)

    @logits.setter
    def logits(self, value: Any) -> None:
        self._backend.write(SiteKind.LOGITS, None, value)

    @property
    def next_token_probs(self) -> Any:
        """Softmax of the last position's logits, ``[batch, vocab]``.

        Writing it sets the last position's logits to the log of the given
        probabilities, which is what sampling then draws from.
        """
        return torch.softmax(self.logits[..., -1, :].float(), dim=-1)

    @next_token_probs.setter
    def next_token_probs(self, value: Any) -> None:
        logits = self.logits
        new = logits.clone()
        new[..., -1, :] = torch.log(value).to(logits.dtype)
        self.logits = new

    # -- running -----------------------------------------------------------------------

    def trace(self, *inputs: Any, **kwargs: Any):
        """Open an nnsight trace of one forward pass (HF) or one vLLM request per prompt.

        Sampling settings (``max_tokens``, ``temperature``, ``top_p``, ``seed``) are
        accepted on both backends; on HF ``max_tokens`` above 1 is an error that points
        to `generate`.
        """
        _check_trace_inputs(inputs)
        return self._backend.trace(*inputs, **kwargs)

    def generate(self, *inputs: Any, max_tokens: int = 1, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, **kwargs: Any):
        """Trace a generation of ``max_tokens`` new tokens; step with ``tracer.iter``."""
        _check_trace_inputs(inputs)
        return self._backend.generate(
            *inputs, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, **kwargs
        )

    def execute(self, plan: Any, prompts: Any, sampling: Any) -> Any:
        """Run a lowered ``nnterp.dsl`` plan on ``prompts``: what ``nnterp.dsl.run`` calls
        after validating and lowering a graph (use ``run`` rather than this).

        Returns:
            An ``nnterp.dsl.recorded.Execution``: recorded values and generated tokens.
        """
        return self._backend.execute(plan, prompts, sampling)

    def execute_many(self, jobs: Any) -> Any:
        """Run several lowered plans, each ``(plan, prompts, sampling)``: what
        ``nnterp.dsl.run_batch`` calls. On vLLM their requests share the engine's batches.

        Returns:
            One ``nnterp.dsl.recorded.Execution`` per job, in order.
        """
        return self._backend.execute_many(jobs)

    def project_on_vocab(self, hidden: Any) -> Any:
        """Final norm and unembedding of a residual-stream tensor (logits over the vocab).

        Works on a value inside a trace and on a saved tensor outside one.
        """
        if isinstance(hidden, torch.Tensor) and not _inside_trace(self):
            with torch.no_grad():
                return self._backend.project_on_vocab(hidden)
        return self._backend.project_on_vocab(hidden)

    def steer(self, layers: int | list[int], vector: torch.Tensor | None = None, scale: float = 1.0,
              positions: int | list[int] | None = None, *, steering_vector: torch.Tensor | None = None,
              factor: float | None = None) -> None:
        """Add ``scale * vector`` to ``layers_output`` of each layer, inside a trace.

        The names are the DSL's (``Steer(layer, vector, scale)``) and the function API's;
        ``steering_vector=`` and ``factor=`` are their old spellings, kept for one release
        with a ``DeprecationWarning``.

        Args:
            layers: a layer index or a list of them.
            vector: ``[hidden]``, finite.
            scale: the vector's strength.
            positions: token positions to steer; ``None`` steers every position.

        Raises:
            ValueError: the vector or the scale is not finite (a NaN would turn every
                later activation and probability into NaN, without an error).
        """
        vector = renamed_argument("model.steer", "steering_vector", steering_vector, "vector", vector)
        scale = renamed_argument("model.steer", "factor", factor, "scale", scale, default=1.0)
        if vector is None:
            raise TypeError("model.steer(layers, vector, scale=1.0) needs a vector")
        _check_finite("model.steer", vector, scale)
        layer_list = [layers] if isinstance(layers, int) else list(layers)
        for layer in layer_list:
            current = self.layers_output[layer]
            delta = (scale * vector).to(device=current.device, dtype=current.dtype)
            steered = current.clone()
            if positions is None:
                steered = steered + delta
            else:
                steered[..., positions, :] = steered[..., positions, :] + delta
            self.layers_output[layer] = steered

    # -- weights -------------------------------------------------------------------------

    def weight(self, name: str) -> torch.Tensor:
        """A weight by its standardized name, the same tensor on both backends.

        The names (`weight_names` lists this model's) are ``"embedding"``,
        ``"position_embedding"`` (GPT-2, OPT), ``"final_norm"``, ``"unembedding"``, and per
        layer ``"layers[i].attention_norm"``, ``"layers[i].attention.q"`` (``k``, ``v``,
        ``o``, ``q_norm``, ``k_norm``), ``"layers[i].attention_output_norm"``,
        ``"layers[i].mlp_norm"``, ``"layers[i].mlp.gate"`` (``up``, ``down``) and
        ``"layers[i].mlp_output_norm"``; ``"<name>.bias"`` is the bias of the same
        module, where it has one (`nnterp.weight_map.LAYER_WEIGHTS` says what each is). A
        negative layer index counts from the last layer.

        The layout is Hugging Face's, whatever the backend stores: a linear weight is
        ``[out_features, in_features]`` as ``torch.nn.Linear`` keeps it (GPT-2's ``Conv1D``
        weights, stored ``[in, out]``, are transposed), so ``attention.q`` is
        ``[heads * head_dim, hidden]`` and ``mlp.down`` ``[hidden, intermediate]``; the
        embedding and the unembedding are ``[vocab, hidden]`` (the real vocabulary: vLLM's
        padding rows are dropped; a tied unembedding equals the embedding); a norm is
        its scale as the checkpoint stores it (Gemma's norms multiply by ``1 + weight``).
        Weights packed into one module (GPT-2's ``c_attn``, vLLM's ``qkv_proj`` and
        ``gate_up_proj``) are cut apart, and under tensor parallelism the ranks' shards
        are put together: the result equals the checkpoint's tensor.

        Why a method, not ``model.nnsight_model.lm_head.weight``: on vLLM the weights live
        in the engine's worker processes, and this process holds only their shapes (a
        meta-device copy of the model); this method asks the engine.

        Args:
            name: the standardized weight name.

        Returns:
            A tensor of its own (editing it does not edit the model), in the model's
            dtype: on the model's device on HF, on the CPU on vLLM. Call it outside a
            trace and use the tensor inside; inside one it also works on HF, and on vLLM
            without tensor parallelism.

        Raises:
            ValueError: this model has no weight of that name; the message suggests the
                closest name and lists the valid ones.
            IndexError: a layer index out of range.
            NotImplementedError: a per-layer weight of a family whose layers nnterp does
                not map.

        Example:
            >>> london = model.tokenizer(" London", add_special_tokens=False)["input_ids"][0]  # doctest: +SKIP
            >>> direction = model.weight("unembedding")[london]             # doctest: +SKIP
            >>> model.weight("layers[3].attention.q").shape                 # doctest: +SKIP
            torch.Size([576, 576])
        """
        return self._backend.weight(name)

    def weight_names(self) -> list[str]:
        """Every name `weight` takes for this model, in the order a forward pass uses them:
        the embeddings, each layer's weights, the final norm, the unembedding."""
        return self._backend.weight_names()

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Free the backend's resources (the vLLM engine and its processes)."""
        self._backend.close()

    def __enter__(self) -> "StandardizedTransformer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        # Only reached for names not defined above: fall through to nnsight, so raw
        # module paths (model.model.layers[0]) work on the same object.
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return getattr(self._backend.model, name)
        except AttributeError:
            pass
        import difflib

        known = [n for n in dir(type(self)) if not n.startswith("_")] + [
            n for n in vars(self) if not n.startswith("_")]
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]!r}?" if close else \
            " (nor has the underlying nnsight model, nor its module)"
        raise AttributeError(f"StandardizedTransformer has no attribute {name!r}{hint}") from None

    def __repr__(self) -> str:
        return (
            f"StandardizedTransformer({self.name_or_path!r}, backend={self.backend!r}, "
            f"num_layers={self.num_layers}, hidden_size={self.hidden_size})"
        )


def _check_trace_inputs(inputs: tuple) -> None:
    """Refuse what a trace cannot run, before nnsight turns it into an error about its
    internals: an empty list of prompts, or an empty prompt (no token to run)."""
    for value in inputs:
        if isinstance(value, str) and not value:
            raise ValueError("the prompt is empty: a trace needs at least one token; pass some text")
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError("the list of prompts is empty: pass a prompt, a non-empty list of them, "
                                 "or no argument and tracer.invoke(prompt) for each")
            empty = [i for i, item in enumerate(value) if isinstance(item, str) and not item]
            if empty:
                raise ValueError(f"prompts[{empty[0]}] is empty: a trace needs at least one token per prompt")


def _check_finite(where: str, vector: Any, scale: Any) -> None:
    """Refuse a steering vector or scale with NaN or infinity (a real tensor, not a value
    of the trace): one NaN makes every later activation NaN, and nothing fails."""
    import math

    if isinstance(scale, (int, float)) and not math.isfinite(scale):
        raise ValueError(f"{where}: scale is {scale}; steering needs a finite scale")
    if isinstance(vector, torch.Tensor) and type(vector) is torch.Tensor and vector.device.type != "meta":
        bad = (~torch.isfinite(vector)).nonzero().flatten()
        if len(bad):
            shown = ", ".join(str(i) for i in bad[:5].tolist()) + (", ..." if len(bad) > 5 else "")
            raise ValueError(f"{where}: the vector has {len(bad)} non-finite values (NaN or infinity) at "
                             f"index {shown}; steering with it would make every later activation NaN")


def _choose_backend(backend: str | None, use_vllm: bool) -> str:
    if backend is None:
        return VLLM.name if use_vllm else DEFAULT_BACKEND
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if use_vllm and backend != VLLM.name:
        raise ValueError(f"use_vllm=True contradicts backend={backend!r}; pass only one of them")
    return backend


def _inside_trace(model: StandardizedTransformer) -> bool:
    return is_interleaving(model._backend.model)


def model_identity(name_or_path: str, config: Any) -> dict[str, Any]:
    """`StandardizedTransformer.identity` of a model loaded from ``name_or_path`` with
    ``config`` (also what a server reports for the model it serves)."""
    import hashlib
    import json

    text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    folder = resolve_model_name(name_or_path)
    weights = None
    if os.path.isdir(folder):
        digest = hashlib.sha256()
        for name in sorted(os.listdir(folder)):
            if name.endswith((".safetensors", ".bin")) or name.endswith(".index.json"):
                path = os.path.join(folder, name)
                digest.update(f"{name}:{os.path.getsize(path)}\n".encode())
                if name.endswith(".index.json"):
                    with open(path, "rb") as handle:
                        digest.update(handle.read())
        weights = digest.hexdigest()
    return {
        "name_or_path": name_or_path,
        "config_digest": hashlib.sha256(text.encode()).hexdigest(),
        "weights_digest": weights,
    }
