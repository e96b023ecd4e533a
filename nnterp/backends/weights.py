"""Reading weights by standardized name: unpacking, vLLM's shards, and the client's meta copy.

`nnterp.weight_map.weight_ref` says where a standardized weight (``"layers[3].attention.q"``)
lives in a Hugging Face module tree. What it takes to read it there differs by backend:

1. **Hugging Face** holds the tensor itself. Some families pack several projections
   into one module (GPT-2's ``c_attn``: q, k, v); `unpack` cuts out the part, and
   GPT-2's ``Conv1D`` stores ``[in, out]``, which the HF backend transposes, so every
   linear weight reads ``[out_features, in_features]`` as ``torch.nn.Linear`` stores it.
2. **vLLM** packs more (``qkv_proj`` = q, k, v; ``gate_up_proj`` = gate, up), pads the
   vocabulary, and under tensor parallelism gives each rank a shard. The client maps a
   ref onto vLLM's module with `locate` (on its meta copy of the module tree, which has
   the engine's module types and packing), each worker cuts out its rank's share of the
   part with `local_pieces` (using the layer's own ``output_partition_sizes``, head
   counts and ``shard_indices``), and `assemble` puts the shares back together in the
   client, dropping replicas and padding, so the result equals the checkpoint's tensor.
   vLLM's CPU backend keeps linear weights only in its kernels' packed formats; there
   the layer's own matmul gives them back (`_weight_from_cpu_kernel`).
3. **The client's meta copy** of a vLLM model has the shapes of the weights and no
   values. `guard_meta_parameters` swaps its parameters for `MetaParameter` objects,
   whose shape, dtype and device read as before, but any computation with their values
   raises a `BackendUnsupportedError` that points to ``model.weight(...)`` instead of
   torch's "Cannot copy out of meta tensor".

vLLM is imported only inside `local_pieces`, which runs in the engine's workers.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from nnterp.errors import BackendUnsupportedError
from nnterp.rename import resolve_path
from nnterp.weight_map import WeightRef

__all__ = ["HeadLayout", "unpack", "EngineWeight", "locate", "local_pieces", "assemble", "MetaParameter",
           "MetaTensor", "guard_meta_parameters", "META_WEIGHT_MESSAGE"]


# -- packed modules ------------------------------------------------------------------------


@attrs.frozen
class HeadLayout:
    """The attention's head counts, which say where q, k and v are in a packed module."""

    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: Any) -> "HeadLayout":
        """From a Hugging Face configuration (``n_head`` and friends resolve through its
        attribute map); ``head_dim`` defaults to ``hidden_size // heads``."""
        heads = int(config.num_attention_heads)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(heads, int(kv_heads), int(head_dim))


def unpack(tensor: torch.Tensor, packing: str, part: int, heads: HeadLayout) -> torch.Tensor:
    """Part ``part`` of a packed module's weight or bias (output rows first), laid out
    as `nnterp.weight_map.WeightSource` describes ``packing``.

    Example:
        >>> w = torch.arange(8.0).reshape(8, 1)        # q: 4 rows, k: 2, v: 2
        >>> unpack(w, "qkv", 1, HeadLayout(heads=2, kv_heads=1, head_dim=2)).flatten().tolist()
        [4.0, 5.0]
    """
    rows = tensor.shape[0]
    if packing == "halves":
        return tensor.chunk(2, dim=0)[part]
    if packing == "qkv":
        sizes = [heads.heads * heads.head_dim] + [heads.kv_heads * heads.head_dim] * 2
        if sum(sizes) != rows:
            raise ValueError(f"a packed q/k/v tensor of {rows} rows does not fit {heads} ({sum(sizes)} rows)")
        return tensor.split(sizes, dim=0)[part]
    if packing == "qkv_per_head":
        if 3 * heads.heads * heads.head_dim != rows:
            raise ValueError(f"a per-head packed q/k/v tensor of {rows} rows does not fit {heads}")
        per_head = tensor.reshape(heads.heads, 3, heads.head_dim, *tensor.shape[1:])
        return per_head[:, part].reshape(heads.heads * heads.head_dim, *tensor.shape[1:])
    raise ValueError(f"nnterp bug: unknown packing {packing!r}")


# -- vLLM: where a weight is, each rank's share, and the whole --------------------------------


@attrs.frozen
class EngineWeight:
    """A standardized weight as vLLM holds it: the module in vLLM's tree, which tensor,
    which output partition of a layer that packs several (``qkv_proj``'s q, k, v), and
    whether the client must still `unpack` the whole tensor (a packing vLLM keeps as one
    partition, such as GPT-NeoX's per-head ``query_key_value``)."""

    module: str
    tensor: str
    partition: int | None = None
    unpack: bool = False


def locate(root: torch.nn.Module, ref: WeightRef) -> EngineWeight | None:
    """Where vLLM's model ``root`` keeps ``ref``; None where it has no such tensor.

    A module that vLLM merged into another (``q_proj`` into ``qkv_proj``) is found
    through the model's ``packed_modules_mapping`` (vLLM's own record of which Hugging
    Face modules each merged module holds, in order), which gives the partition.
    """
    module, path, partition = resolve_path(root, ref.module), ref.module, None
    if module is None:
        parent, _, leaf = ref.module.rpartition(".")
        for merged, members in (getattr(root, "packed_modules_mapping", None) or {}).items():
            if leaf in members and merged != leaf:
                candidate = f"{parent}.{merged}"
                module = resolve_path(root, candidate)
                if module is not None:
                    path, partition = candidate, list(members).index(leaf)
                    if len(getattr(module, "output_partition_sizes", ())) != len(members):
                        return None  # packed in a way nnterp does not know
                    break
    if module is None or not isinstance(getattr(module, ref.tensor, None), torch.Tensor):
        return None
    unpacked = False
    if ref.packing is not None:
        if len(getattr(module, "output_partition_sizes", ())) > 1:
            partition = ref.part  # vLLM keeps Hugging Face's parts as its partitions
        else:
            unpacked = True
    return EngineWeight(path, ref.tensor, partition, unpacked)


def local_pieces(model: torch.nn.Module, where: EngineWeight) -> list[tuple[int, int, int, torch.Tensor]]:
    """This rank's share of a weight, in the engine's worker: ``(dim, start, length,
    piece)`` triples, each saying that ``piece`` sits at ``start`` along ``dim`` of the
    whole tensor, which is ``length`` long there. Ranks that hold the same piece (a
    replicated norm, a k/v head shared by several ranks) say the same ``start``.

    Vocabulary rows past the real vocabulary (vLLM's padding) are left out.

    Raises:
        NotImplementedError: a quantized layer, whose tensors are not the weights.
    """
    from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    module = resolve_path(model, where.module)
    method = type(getattr(module, "quant_method", None)).__name__
    if method not in ("NoneType", "UnquantizedLinearMethod", "UnquantizedEmbeddingMethod"):
        raise NotImplementedError(f"{where.module} is quantized ({method}); nnterp reads unquantized weights only")
    tensor = getattr(module, where.tensor).detach()
    if where.tensor == "weight" and tensor.numel() == 0 and hasattr(module, "cpu_linear"):
        tensor = _weight_from_cpu_kernel(module)
    tensor = tensor.to(getattr(module, "params_dtype", tensor.dtype))
    if isinstance(module, VocabParallelEmbedding):
        shard = module.shard_indices
        return [(0, shard.org_vocab_start_index, module.org_vocab_size, tensor[: shard.num_org_elements])]
    if isinstance(module, RowParallelLinear) and where.tensor == "weight":
        # split along the input; the bias is whole on every rank
        return [(1, module.tp_rank * module.input_size_per_partition, module.input_size, tensor)]
    if isinstance(module, ColumnParallelLinear):
        sizes = list(module.output_partition_sizes)
        part = where.partition or 0
        if where.partition is None and len(sizes) > 1:
            if module.tp_size > 1:
                raise NotImplementedError(f"nnterp bug: {where.module} packs {len(sizes)} parts; name one")
            sizes, part = [sum(sizes)], 0
        piece = tensor.narrow(0, sum(sizes[:part]), sizes[part])
        # several ranks share each k/v head where there are fewer k/v heads than ranks
        replicas = module.num_kv_head_replicas if isinstance(module, QKVParallelLinear) and part > 0 else 1
        shards = module.tp_size // replicas
        return [(0, module.tp_rank // replicas * sizes[part], shards * sizes[part], piece)]
    return [(0, 0, tensor.shape[0], tensor)]


#: Rows of the identity `_weight_from_cpu_kernel` feeds a layer at once.
_PROBE_ROWS = 1024


@torch.no_grad()
def _weight_from_cpu_kernel(module: torch.nn.Module) -> torch.Tensor:
    """A linear layer's weight, ``[out, in]``, from vLLM's CPU GEMM kernel.

    vLLM's CPU backend repacks each linear layer's weight into its kernel's own format
    (oneDNN's, or a blocked one for small AMX matmuls) and frees the original
    (``dispatch_cpu_unquantized_gemm``). The layer's own matmul, applied to the rows of
    the identity, gives the weight back exactly: each output is one weight times 1 plus
    zeros. A block of rows at a time, so the probe never takes more than about
    `_PROBE_ROWS` rows' worth of the weight.
    """
    # this rank's input width (row-parallel layers split it); a replicated layer has it whole
    width = getattr(module, "input_size_per_partition", None) or module.input_size
    dtype = getattr(module, "params_dtype", torch.float32)
    blocks = []
    for start in range(0, width, _PROBE_ROWS):
        rows = min(_PROBE_ROWS, width - start)
        probe = torch.zeros(rows, width, dtype=dtype)
        probe[:, start:start + rows] = torch.eye(rows, dtype=dtype)
        blocks.append(module.cpu_linear(probe, module.weight, None))
    return torch.cat(blocks).t().contiguous()


def assemble(pieces: list[tuple[int, int, int, torch.Tensor]]) -> torch.Tensor:
    """The whole tensor from every rank's `local_pieces`, in the client.

    Example:
        >>> a, b = torch.zeros(2, 3), torch.ones(1, 3)
        >>> assemble([(0, 2, 3, b), (0, 0, 3, a), (0, 0, 3, a)]).shape   # rank 1, then two replicas
        torch.Size([3, 3])
    """
    dim, length = pieces[0][0], pieces[0][2]
    by_start: dict[int, torch.Tensor] = {}
    for _, start, _, piece in pieces:
        by_start.setdefault(start, piece)
    ordered = [by_start[start] for start in sorted(by_start)]
    starts = sorted(by_start)
    ends = [start + piece.shape[dim] for start, piece in zip(starts, ordered)]
    if starts[0] != 0 or starts[1:] != ends[:-1] or ends[-1] != length:
        raise RuntimeError(f"nnterp bug: the ranks' pieces cover {list(zip(starts, ends))} of {length} along dim {dim}")
    return ordered[0] if len(ordered) == 1 else torch.cat(ordered, dim=dim)


# -- the client's meta copy of a vLLM model -------------------------------------------------

#: What computing with a weight of the client's meta copy raises, after what was asked.
META_WEIGHT_MESSAGE = (
    "the vLLM backend's weights live in the engine's worker processes; this process's copy of the "
    "model (model.nnsight_model) holds their shapes only, on the meta device. Read a weight with "
    "model.weight(name), which fetches it from the engine in Hugging Face's layout, e.g. "
    "model.weight('unembedding')[token_id] for a token's unembedding row (model.weight_names() lists "
    "the names), or use the module inside a trace, where the code runs on the engine's model")


def _no_data(what: str) -> BackendUnsupportedError:
    return BackendUnsupportedError(f"{what} needs the values of a weight, but {META_WEIGHT_MESSAGE}")


def _is_alias(func: Any) -> bool:
    """Whether ``func`` hands back the same values without computing with them: what
    torch's own module code does with parameters (``.data``, ``.detach()``)."""
    name = getattr(func, "__name__", "")
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", "") == "data"
    return name in ("detach", "requires_grad_")


def _op_name(func: Any) -> str:
    """How to name a torch operation in a message: ``torch.norm`` as ``norm()``, a
    property getter by the property (``T``)."""
    name = getattr(func, "__name__", str(func))
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", name)
    return {"__getitem__": "indexing", "__setitem__": "assigning into it"}.get(name, f"{name}()")


def _as_meta_tensor(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and not isinstance(value, MetaTensor) and value.is_meta:
        return value.as_subclass(MetaTensor)
    return value


class MetaTensor(torch.Tensor):
    """A tensor of the vLLM client's meta copy of a model: its metadata answers, its values
    refuse (see `META_WEIGHT_MESSAGE`).

    Anything that returns a tensor computes with the values (indexing, ``clone``, ``norm``,
    ``.cpu()``), so it raises where the user wrote it, rather than as torch's "Cannot copy
    out of meta tensor" at the first copy, or inside the engine once the result has been
    shipped into a trace. Metadata (``shape``, ``dtype``, ``device``, ``numel()``,
    ``is_meta``) and aliases (``.data``, ``.detach()``) work. Under a fake-tensor mode
    (nnsight's ``scan`` propagating shapes through the meta tree) everything runs as on
    any meta tensor.
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            with torch._C.DisableTorchFunctionSubclass():
                result = func(*args, **kwargs)
        except Exception as err:
            if "meta" in str(err):
                raise _no_data(_op_name(func)) from err
            raise
        if _is_alias(func):
            return _as_meta_tensor(result)
        returns_tensor = isinstance(result, torch.Tensor) or (
            isinstance(result, (tuple, list)) and any(isinstance(item, torch.Tensor) for item in result))
        if returns_tensor and not _in_fake_mode():
            raise _no_data(_op_name(func))
        return result

    def __reduce_ex__(self, protocol):
        # shipped into a trace, it stays a meta tensor that explains itself in the worker
        return _meta_tensor, (tuple(self.shape), self.dtype)


class MetaParameter(MetaTensor, torch.nn.Parameter):
    """A parameter of the vLLM client's meta copy of a model; see `MetaTensor`."""

    __torch_function__ = MetaTensor.__dict__["__torch_function__"]
    __reduce_ex__ = MetaTensor.__reduce_ex__


def _meta_tensor(shape: tuple, dtype: torch.dtype) -> MetaTensor:
    return torch.empty(shape, dtype=dtype, device="meta").as_subclass(MetaTensor)


def _in_fake_mode() -> bool:
    from torch._guards import detect_fake_mode

    return detect_fake_mode() is not None


def guard_meta_parameters(root: torch.nn.Module) -> None:
    """Swap every meta-device parameter of ``root`` for a `MetaParameter`, in place.

    A parameter shared by several modules (an unembedding tied to the embedding) stays
    one object, so the tie still reads as one.
    """
    swapped: dict[int, MetaParameter] = {}
    for module in root.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is None or not parameter.is_meta or isinstance(parameter, MetaParameter):
                continue
            if id(parameter) not in swapped:
                guarded = MetaParameter(parameter.data, requires_grad=parameter.requires_grad)
                guarded.__dict__.update(parameter.__dict__)  # vLLM's loader attributes
                swapped[id(parameter)] = guarded
            module._parameters[name] = swapped[id(parameter)]
