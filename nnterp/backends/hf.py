"""The Hugging Face backend: standardized sites over nnsight's ``TransformersModel``.

nnsight 0.8 runs the body of a ``with model.trace(...)`` block beside the model and hands
it the real tensors as each module runs, so a read here is the live activation and an
in-place edit of it acts on the model. Modules that return tuples (attention returns
``(output, weights)``) are unpacked on read and repacked on write, so the standardized
value is always a ``[batch, seq, hidden]`` tensor.

Attention probabilities are not a module output in transformers: they are an
intermediate of the attention function. With ``enable_attention_probs=True`` the model
is loaded with eager attention, and the probabilities are the output of the dropout that
follows the softmax inside that function, reached through nnsight's ``.source``. Reading
that operation gives the probabilities the model uses; writing it changes the output.
The operation's name is found at load time, not spelled per family.
"""

from __future__ import annotations

from typing import Any, Sequence

import attrs
import torch

from nnterp.limits import HF as HF_LIMITS
from nnterp.backends.base import Backend
from nnterp.backends.load_check import PROBE_TEXT, check_sites, warn_untested
from nnterp.backends.internals import torch_module, untraced_generate
from nnterp.backends.interpret import RunScratch, generation_may_end_early, run_step
from nnterp.backends.weights import HeadLayout, unpack
from nnterp.dsl.plan import Plan, Prompts, Sampling
from nnterp.dsl.recorded import Execution, Recorder
from nnterp.errors import ArchitectureNotSupportedError, BackendUnsupportedError
from nnterp.rename import (KNOWN_ARCHITECTURES, ModulePaths, mapping_error_message, missing_paths, paths_for,
                           resolve_path)
from nnterp.sites import SiteKind

__all__ = ["HFBackend"]

#: how this backend runs plans, as the run manifest records it
_EXECUTOR = "hf/nnsight: one left-padded batch per run"


#: padded tokens per batch of a DSL run on HF, by default: 64 Ki tokens is 512 prompts of
#: 128 tokens, about 8 GB of float32 activations through a 1.1B model's 22 layers
DEFAULT_BATCH_TOKENS = 1 << 16


def padded_batches(lengths: Sequence[int], steps: int, budget: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive prompts whose padded batch, rows x (longest
    prompt + ``steps``), holds at most ``budget`` tokens; a prompt longer than the budget
    is a batch of its own.

    Example:
        >>> padded_batches([4, 4, 4, 10, 2], steps=1, budget=12)
        [(0, 2), (2, 3), (3, 4), (4, 5)]
    """
    batches: list[tuple[int, int]] = []
    start, longest = 0, 0
    for index, length in enumerate(lengths):
        wider = max(longest, length + steps)
        if index > start and wider * (index - start + 1) > budget:
            batches.append((start, index))
            start, wider = index, length + steps
        longest = wider
    if len(lengths) > start:
        batches.append((start, len(lengths)))
    return batches


class HFBackend(Backend):
    """Standardized sites on an nnsight ``TransformersModel``.

    Args:
        name_or_path: a Hugging Face model folder or hub id.
        paths: where the components live, for a family nnterp does not know.
        enable_attention_probs: load with eager attention so attention probabilities can
            be read and written.
        check: run the load-time probe that checks every accessor's shape.
        **kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``, ...).
    """

    limits = HF_LIMITS

    def __init__(
        self,
        name_or_path: str,
        *,
        paths: ModulePaths | None = None,
        enable_attention_probs: bool = False,
        check: bool = True,
        quiet: bool = False,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        **kwargs: Any,
    ) -> None:
        from nnsight.modeling.transformers import TransformersModel

        if not isinstance(batch_tokens, int) or isinstance(batch_tokens, bool) or batch_tokens < 1:
            raise ValueError(f"batch_tokens must be a positive int (padded tokens per forward batch), "
                             f"got {batch_tokens!r}")
        #: the most padded tokens (rows x (longest prompt + generated tokens)) one batch of
        #: a DSL run holds: a run of 100,000 prompts is many batches, not one
        self.batch_tokens = batch_tokens
        if quiet:  # transformers' loading bar and warnings (`nnterp.quiet`)
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()

        if enable_attention_probs:
            requested = kwargs.get("attn_implementation")
            if requested not in (None, "eager"):
                raise ValueError(
                    f"enable_attention_probs=True needs attn_implementation='eager' (the only "
                    f"implementation that materialises probabilities), got {requested!r}"
                )
            kwargs["attn_implementation"] = "eager"
        self.enable_attention_probs = enable_attention_probs
        self.model = TransformersModel(name_or_path, task="text-generation", dispatch=True, **kwargs)
        root = torch_module(self.model)
        model_type = getattr(self.model.config, "model_type", "?")
        self.paths = paths if paths is not None else paths_for(model_type, root)
        problems = missing_paths(root, self.paths)
        if problems:
            raise ArchitectureNotSupportedError(mapping_error_message(model_type, type(root).__name__, problems))
        self._torch_layers = resolve_path(root, self.paths.layers)
        self._final_norm = resolve_path(root, self.paths.final_norm) if self.paths.final_norm else None
        self._lm_head = resolve_path(root, self.paths.lm_head)
        # OPT variants whose word embeddings are narrower than the residual stream
        # project back before the unembedding.
        self._project_out = getattr(getattr(getattr(root, "model", None), "decoder", None), "project_out", None)
        self._softcap = getattr(self.model.config, "final_logit_softcapping", None)
        self._probs_ops: dict[int, tuple[str, str]] = {}
        if check:
            self._check_accessors()
        if paths is None and model_type not in KNOWN_ARCHITECTURES:
            warn_untested(model_type, check)

    # -- description -----------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self._torch_layers)

    @property
    def attention_probs_enabled(self) -> bool:
        return self.enable_attention_probs

    # -- reading and writing ---------------------------------------------------------

    def _envoy(self, kind: SiteKind, layer: int | None):
        # the causal-LM output holds the logits (after any final softcapping)
        return self.model if kind is SiteKind.LOGITS else self._module_envoy(kind, layer)

    def read(self, kind: SiteKind, layer: int | None) -> Any:
        if kind is SiteKind.ATTENTION_PROBABILITIES:
            return self._probs_op(layer).output
        envoy = self._envoy(kind, layer)
        if kind is SiteKind.LAYERS_INPUT:
            return envoy.input
        if kind is SiteKind.LOGITS:
            return envoy.output.logits
        if kind is SiteKind.MLPS_OUTPUT and self.paths.mlp_flattens_tokens:
            # The attention output of the same layer runs just before the MLP and has
            # the [batch, seq, hidden] shape; read it first, as nnsight needs model
            # order. The view keeps in-place edits reaching the model.
            shape = self.read(SiteKind.ATTENTIONS_OUTPUT, layer).shape
            out = envoy.output
            return (out[0] if isinstance(out, tuple) else out).view(shape)
        out = envoy.output
        return out[0] if isinstance(out, tuple) else out

    def write(self, kind: SiteKind, layer: int | None, value: Any) -> None:
        if kind is SiteKind.ATTENTION_PROBABILITIES:
            self._probs_op(layer).output = value
            return
        envoy = self._envoy(kind, layer)
        if kind is SiteKind.LAYERS_INPUT:
            envoy.input = value
            return
        if kind is SiteKind.LOGITS:
            # The causal-LM output is a ModelOutput; generation reads .logits from
            # this same object after the forward returns.
            envoy.output.logits = value
            return
        if kind is SiteKind.MLPS_OUTPUT and self.paths.mlp_flattens_tokens:
            value = value.reshape(-1, value.shape[-1])
        current = envoy.output
        envoy.output = (value, *current[1:]) if isinstance(current, tuple) else value

    def _probs_op(self, layer: int):
        if not self.enable_attention_probs:
            raise BackendUnsupportedError(
                "attention probabilities need the model loaded with "
                "StandardizedTransformer(..., enable_attention_probs=True)"
            )
        attention = self._envoy(SiteKind.ATTENTION_PROBABILITIES, layer)
        call, op = self._probs_ops.get(layer) or self._find_probs_op(attention)
        self._probs_ops[layer] = (call, op)
        return attention.source.node(call).source.node(op)

    @staticmethod
    def _find_probs_op(attention) -> tuple[str, str]:
        # The attention function is called last among the `attention_interface*`
        # operations of the attention forward (earlier ones bind it); inside it, the
        # probabilities are the dropout applied after the softmax, or the softmax
        # itself where there is no dropout.
        calls = [name for name in attention.source.names if name.startswith("attention_interface")]
        if not calls:
            raise ArchitectureNotSupportedError(
                f"{attention.path}: its forward calls no attention_interface, so nnterp cannot "
                f"find where attention probabilities are computed"
            )
        inner = attention.source.node(calls[-1]).source.names
        for prefix in ("nn_functional_dropout", "dropout", "nn_functional_softmax", "softmax"):
            ops = [name for name in inner if name.startswith(prefix)]
            if ops:
                return calls[-1], ops[-1]
        raise ArchitectureNotSupportedError(
            f"{attention.path}: the attention function has no softmax or dropout operation to read "
            f"probabilities from (operations: {', '.join(inner)})"
        )

    # -- running -------------------------------------------------------------------------

    def trace(self, *inputs: Any, **kwargs: Any):
        max_tokens = kwargs.pop("max_tokens", 1)
        if max_tokens is not None and max_tokens != 1:
            raise ValueError(
                f"trace runs one forward pass on the HF backend, so max_tokens={max_tokens} "
                f"cannot apply; use model.generate(..., max_tokens={max_tokens}) to generate"
            )
        # A single forward pass is deterministic: sampling settings have nothing to act on.
        for key in ("temperature", "top_p", "seed"):
            kwargs.pop(key, None)
        return self.model.trace(*inputs, **kwargs)

    def generate(self, *inputs: Any, max_tokens: int = 1, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, **kwargs: Any):
        if seed is not None:
            torch.manual_seed(seed)
        sampling = {"do_sample": temperature > 0}
        if temperature > 0:
            sampling.update(temperature=temperature, top_p=top_p)
        else:
            # The checkpoint's generation_config may ask for sampling; greedy is greedy.
            sampling.update(temperature=None, top_p=None, top_k=None)
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        # nnsight's `generate` decides between "trace" and "just run" by looking for a
        # `with` statement in its caller's frame, which here is this function; open the
        # generation trace explicitly so the caller's `with` block is what gets traced.
        run_generation = untraced_generate(self.model)
        return self.model.trace(*inputs, fn=run_generation, max_new_tokens=max_tokens, **sampling, **kwargs)

    def execute(self, plan: Plan, prompts: Sequence[str], sampling: Sampling) -> Execution:
        """Run a lowered plan: the prompts in left-padded batches of at most
        ``batch_tokens`` padded tokens each (prompt and generated), in order.

        Generation goes through ``generate`` (one forward pass per step, stepped with
        ``tracer.iter``); a plan with a gradient runs one forward pass with autograd on,
        since ``generate`` runs without it, and takes the greedy next token.
        """
        prompts = Prompts.of(prompts, self.tokenizer)
        token_ids = prompts.token_ids
        store = Recorder()
        tokens: list = []
        steps = 1 if plan.needs_grad else sampling.max_tokens
        batches = padded_batches([len(ids) for ids in token_ids], steps, self.batch_tokens)
        for start, stop in batches:
            # a run seed seeds each batch apart (HF seeds torch once per generation):
            # copies of a prompt in two batches must not sample alike
            own = sampling if (len(batches) == 1 and not prompts.first) or sampling.seed is None else \
                attrs.evolve(sampling, seed=sampling.request_seed(prompts.first + start))
            tokens += self._execute_batch(plan, token_ids[start:stop], list(range(start, stop)), own, store)
        return Execution(store.recorded(), tokens, _EXECUTOR)

    def _execute_batch(self, plan: Plan, token_ids: Sequence[Sequence[int]], rows: list[int], sampling: Sampling,
                       store: Recorder) -> list[list[int]]:
        """One padded batch of a run: ``rows`` are its prompts' indices in the run. The
        tokens it generated, per row."""
        # The batch goes to nnsight as token ids: given text, nnsight tokenizes each
        # prompt through the pipeline on its own, 0.12 s per 1,000 prompts here against
        # 4 ms for ids (an H200 runs a 1.1B forward pass over 1,000 such prompts in about
        # 0.25 s). nnsight still derives the position ids of left-padded rows from the mask.
        batch = _left_padded(token_ids, self.tokenizer.pad_token_id)
        width = batch["input_ids"].shape[1]
        pads = (batch["attention_mask"] == 0).sum(dim=1).tolist()
        scratch = RunScratch()
        if plan.needs_grad:
            with torch.enable_grad(), self.trace(batch):
                run_step(self, plan, 0, rows, pads, store, scratch)
                next_ids = self.read(SiteKind.LOGITS, None)[:, -1].argmax(-1).save()
            _wait_for_device()
            return [[int(t)] for t in next_ids]
        steps = plan.max_step + 1
        fed: list = []  # the token each forward pass after the first was fed: [rows] per step
        result: list = []
        with generation_may_end_early(), torch.no_grad(), self.generate(
                batch, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                top_p=sampling.top_p, seed=sampling.seed) as tracer:
            for step in tracer.iter[:steps]:
                if step > 0:  # read before the layers: it is this forward pass's input
                    fed.append(self.model.inputs[1]["input_ids"][:, -1].cpu())
                run_step(self, plan, step, rows, pads, store, scratch)
            # Not reached when every prompt ends (end of sequence) before `steps` steps;
            # the tokens fed to the later passes then tell what was generated.
            result.append(tracer.result.save())
        eos = self.tokenizer.eos_token_id
        if result:
            generated = result[0][:, width:].tolist()
        else:
            # generation stopped because every row had ended: the last token of a row
            # that was still running is the end-of-sequence token
            columns = [column.tolist() for column in fed]
            generated = [[column[b] for column in columns] + [eos] for b in range(len(rows))]
        _wait_for_device()
        # finished rows are padded with the pad (= eos) token; keep up to the first eos
        return [row[: row.index(eos) + 1] if eos in row else row for row in generated]

    def project_on_vocab(self, hidden: Any) -> Any:
        # Direct module calls: inside a trace they run as ordinary torch code on the
        # live tensor, and do not count as a call of lm_head that nnsight would watch.
        x = hidden
        if self._final_norm is not None:
            x = self._final_norm(x)
        if self._project_out is not None:
            x = self._project_out(x)
        logits = self._lm_head(x)
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def _locate_weight(self, ref: Any) -> Any:
        module = resolve_path(torch_module(self.model), ref.module)
        tensor = getattr(module, ref.tensor, None) if module is not None else None
        return (module, tensor) if isinstance(tensor, torch.Tensor) else None

    def _read_weight(self, ref: Any, where: Any) -> torch.Tensor:
        # A copy, as on vLLM: editing it does not edit the model.
        module, tensor = where
        value = tensor.detach()
        if ref.tensor == "weight" and _is_conv1d(module):
            value = value.t()  # GPT-2's Conv1D stores [in, out]; every linear reads [out, in]
        if ref.packing is not None:
            value = unpack(value, ref.packing, ref.part, HeadLayout.of(self.config))
        return value.clone()

    def close(self) -> None:
        pass

    # -- load-time check -----------------------------------------------------------------

    def _check_accessors(self) -> None:
        """Read every accessor once on a short prompt and check what it claims
        (`nnterp.backends.load_check`). ``check=False`` skips it."""
        check_sites(self, self.model.trace, model_type=self.config.model_type,
                    class_name=type(torch_module(self.model)).__name__, hidden=self.config.hidden_size,
                    n_tokens=len(self.tokenizer(PROBE_TEXT)["input_ids"]),
                    vocab=getattr(self._lm_head, "out_features", None), logits_every_position=True,
                    attention_probabilities=self.enable_attention_probs)


def _left_padded(token_ids: Sequence[Sequence[int]], pad_id: int | None) -> dict[str, torch.Tensor]:
    """Rows of token ids as one left-padded batch: ``input_ids`` and ``attention_mask``,
    as the tokenizer pads them for generation (pad tokens first, masked out)."""
    width = max(map(len, token_ids))
    if pad_id is None:
        if any(len(row) != width for row in token_ids):
            raise ValueError("the tokenizer has no pad token, so prompts of different lengths cannot share a batch")
        pad_id = 0  # never placed: every row is full
    ids = torch.tensor([[pad_id] * (width - len(row)) + list(row) for row in token_ids], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in token_ids], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask}
def _is_conv1d(module: Any) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's linear layers, weight ``[in, out]``)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _wait_for_device() -> None:
    # results are copied off the device without blocking (see interpret._keep)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
