"""How a lowered plan runs on a vLLM engine: the two executors.

- `execute_batched_many` (the default): the plans are installed in every worker, the
  prompts of all of them run as ordinary vLLM requests tagged with their plan and row
  (one ``generate``: they share the engine's batches), and what the workers recorded
  is collected once at the end (`nnterp.backends.vllm_batch`, `nnterp.backends.vllm_transport`).
- `execute_nnsight` (``dsl_executor="nnsight"``): one nnsight request per prompt, each
  running the plan's ops through `nnterp.backends.interpret`, as a ``trace`` would.

`nnterp.backends.interpret` serves HF and the nnsight executor (ops run in Python
between modules, per request); `nnterp.backends.batch_program` serves the batched
executor (the plan as per-step tables the engine's hooks read).
"""

from __future__ import annotations

from typing import Any, Sequence

from nnterp.backends.internals import abort_unfinished, plain_engine_steps, sampling_params_fields
from nnterp.backends.interpret import RunScratch, generation_may_end_early, run_step
from nnterp.dsl.plan import Plan, Prompts, Sampling
from nnterp.dsl.recorded import Execution

__all__ = ["execute_batched_many", "execute_async_many", "BatchRequests", "execute_nnsight", "BATCHED", "PER_REQUEST"]

#: how each executor runs plans, as the run manifest records it
PER_REQUEST = "vllm/nnsight: one request per prompt, one intervention per request"
BATCHED = "vllm/batched: the whole plan in the engine's hooks, batch-wide"


def execute_batched_many(backend: Any, jobs: Sequence[tuple[Plan, Sequence[str], Sampling]]) -> list[Execution]:
    """Several plans in one engine call: every plan is installed, the requests of all of
    them go to the engine as one ``generate`` (so they share its batches: no plan waits
    for another's to drain), each tagged with its plan and row; then each plan's
    records are collected. One `Execution` per job, in order."""
    llm = backend.model.vllm_entrypoint
    batch = BatchRequests.of(jobs, backend.model.tokenizer)
    llm.collective_rpc("nnterp_install", args=(batch.payloads(),))
    try:
        with plain_engine_steps(llm.llm_engine):
            outputs = llm.generate(batch.requests, sampling_params=batch.params, use_tqdm=False)
    except BaseException:
        abort_unfinished(llm.llm_engine)  # else they finish in, and count as, the next call
        raise
    finally:
        # always: it also uninstalls the plans, so the engine is ready for the next call
        replies = llm.collective_rpc("nnterp_collect", args=(batch.plan_ids,))
    # outputs come in request order; a stray request's output would shift them all
    if len(outputs) != len(batch.requests) or any(
            list(output.prompt_token_ids) != request["prompt_token_ids"]
            for output, request in zip(outputs, batch.requests)):
        raise RuntimeError("nnterp: the engine returned outputs that are not this call's requests (a request "
                           "of an interrupted call?); run again")
    return batch.executions(replies, [output.outputs[0].token_ids for output in outputs])


async def execute_async_many(engine: Any, tokenizer: Any,
                             jobs: Sequence[tuple[Plan, Sequence[str], Sampling]]) -> list[Execution]:
    """`execute_batched_many` on vLLM's asynchronous engine (``AsyncLLM``, what a server
    runs): the requests go to the engine one by one, each awaited at once, so they join
    its running batches with every other client's."""
    import asyncio
    import uuid

    batch = BatchRequests.of(jobs, tokenizer)
    await engine.collective_rpc("nnterp_install", args=(batch.payloads(),))

    async def one(request: dict, params: Any) -> list[int]:
        final = None
        async for output in engine.generate(request, params, request_id=f"nnterp-{uuid.uuid4().hex}"):
            final = output
        return list(final.outputs[0].token_ids)

    try:
        tokens = await asyncio.gather(*(one(r, p) for r, p in zip(batch.requests, batch.params)))
    finally:
        replies = await engine.collective_rpc("nnterp_collect", args=(batch.plan_ids,))
    return batch.executions(replies, tokens)


class BatchRequests:
    """The engine requests of several plans' jobs: each prompt a request of token ids
    tagged with its plan and row, and what to make of the engine's replies."""

    def __init__(self, jobs: Sequence[tuple[Plan, Any, Sampling]], plan_ids: list[str], requests: list[dict],
                 params: list[Any]) -> None:
        self.jobs, self.plan_ids, self.requests, self.params = jobs, plan_ids, requests, params

    @classmethod
    def of(cls, jobs: Sequence[tuple[Plan, Sequence[str], Sampling]], tokenizer: Any) -> "BatchRequests":
        import uuid

        from vllm import SamplingParams

        plan_ids = [uuid.uuid4().hex for _ in jobs]
        # A prefix served from vLLM's cache is never computed, so no hook would see it,
        # and a prefix a plan edited must not be served to anyone else: with prefix
        # caching on, the run neither reads the cache nor shares what it writes (each
        # plan its own salt).
        fields = sampling_params_fields()
        options = {"skip_reading_prefix_cache": True} if "skip_reading_prefix_cache" in fields else {}
        if "skip_clone" in fields:
            options["skip_clone"] = True  # each request has its own params: no deep copy needed
        # run decodes the generated tokens itself; vLLM's own detokenizer would decode
        # them a second time, request by request (7% of a 1.1B collect of 8,192 prompts
        # on an H200)
        options["detokenize"] = False
        requests, params, tokenized = [], [], []
        templates: dict[Sampling, Any] = {}
        for plan_id, (plan, prompts, sampling) in zip(plan_ids, jobs):
            if sampling not in templates:
                templates[sampling] = SamplingParams(max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                                                     top_p=sampling.top_p, seed=sampling.seed, **options)
            # Token ids, as vLLM would tokenize each prompt one by one: `run` tokenizes a
            # sweep in one batch call, whose cost for thousands of short prompts is about
            # that of their forward passes.
            prompts = Prompts.of(prompts, tokenizer)
            tokenized.append((plan, prompts, sampling))
            params += _tagged_copies(templates[sampling], plan_id, len(prompts), sampling, prompts.first)
            requests += [{"prompt_token_ids": list(ids), "prompt": prompt, "cache_salt": f"nnterp-{plan_id}"}
                         for ids, prompt in zip(prompts.token_ids, prompts)]
        return cls(tokenized, plan_ids, requests, params)

    def payloads(self) -> list[tuple[str, bytes]]:
        """What ``nnterp_install`` takes: each plan, pickled, under its id."""
        import pickle

        return [(plan_id, pickle.dumps(plan)) for plan_id, (plan, _, _) in zip(self.plan_ids, self.jobs)]

    def executions(self, replies: Sequence[Any], tokens: Sequence[Sequence[int]]) -> list[Execution]:
        """One `Execution` per job from the workers' ``nnterp_collect`` replies and each
        request's generated tokens (in request order)."""
        from nnterp.backends.vllm_transport import read_blocks
        from nnterp.errors import NnterpError

        blocks = next(reply for reply in replies if reply is not None and reply[0] is not None)
        executions, at, failed = [], 0, None
        for (plan, prompts, _), payload in zip(self.jobs, blocks):
            try:  # every reply is read (each may hold a shared-memory file to remove)
                values, stats = read_blocks(plan, payload)
            except NnterpError as err:  # a plan that failed in a step; the engine went on
                failed = failed or err
                continue
            executions.append(Execution(values, tokens[at:at + len(prompts)], BATCHED, stats=stats))
            at += len(prompts)
        if failed is not None:
            raise failed
        return executions


def execute_nnsight(backend: Any, plan: Plan, prompts: Sequence[str], sampling: Sampling) -> Execution:
    """One request (invoke) per prompt, in one nnsight trace.

    Each invoke's ops run in the engine's worker; results come back in ``store``, a
    dict saved above the invokes, which nnsight merges key by key across requests.
    Generated tokens come from the engine's own outputs, so no step pays a handoff
    or a device-to-host copy for them.
    """
    import nnsight

    steps = plan.max_step + 1
    first = getattr(prompts, "first", 0)  # the run's row of the first prompt (`Prompts.first`)
    with generation_may_end_early(), backend.generate(
            max_tokens=sampling.max_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, seed=sampling.seed) as tracer:
        store = nnsight.save({})
        # nnsight pickles, for every request, each name its block reads: the prompt
        # pass alone (a lens, a sweep of reads) gets a block without the step loop,
        # which would also ship the tracer.
        if steps == 1:
            for row, prompt in enumerate(prompts):
                with tracer.invoke(prompt, **_own_seed(sampling, first + row)):
                    run_step(backend, plan, 0, [row], [0], store, RunScratch())
        else:
            for row, prompt in enumerate(prompts):
                with tracer.invoke(prompt, **_own_seed(sampling, first + row)):
                    scratch = RunScratch()
                    # The loop ends early, and nothing after it runs, when the
                    # request reaches end of sequence first; so nothing follows it.
                    for step in tracer.iter[:steps]:
                        run_step(backend, plan, step, [row], [0], store, scratch)
    tokens = [output.outputs[0].token_ids for output in backend.model.last_outputs]
    return Execution(dict(store), tokens, PER_REQUEST)


def _own_seed(sampling: Sampling, row: int) -> dict:
    """A request's own sampling seed, as invoke keywords (none without a run seed)."""
    return {} if sampling.seed is None else {"seed": sampling.request_seed(row)}


def _tagged_copies(template: Any, plan_id: str, n: int, sampling: Sampling, first: int = 0) -> list:
    """``n`` shallow copies of ``template``, each tagged with its request's row.

    Each request needs its own params for its tag. Building each anew validates it anew,
    and vLLM's validation reads its environment variables through a slow lookup: 0.6 s of
    a 4,096-prompt lens at 1.1B on an H200 (profiled). A copy of one validated template
    skips all of it; the tag and the request's own seed (`Sampling.request_seed`) are the
    only fields that differ. ``first``: the run's row of the first prompt (a part of a
    run split across engines samples with the run's seeds).
    """
    import copy

    copies = []
    for row in range(n):
        params = copy.copy(template)
        params.extra_args = {"nnterp": [plan_id, row]}
        if sampling.seed is not None:
            params.seed = sampling.request_seed(first + row)
        copies.append(params)
    return copies
