"""What the server adds to vLLM's app: graphs on completions, and the ``/nnterp`` routes.

`NnterpGate` is an ASGI middleware placed inside vLLM's own (after its API-key check):

* ``POST /v1/completions`` and ``POST /v1/chat/completions``: a body's ``"nnterp":
  {"graph": ...}`` is checked (`nnterp.serve.requests.read_graph`, edits only), lowered
  and installed as a plan of its own; the request then goes on to vLLM tagged with it
  (``vllm_xargs``, which vLLM turns into the request's ``extra_args``), and the plan is
  uninstalled when the response has been sent, streamed or not. On every POST, a tag a
  client sets itself is removed (a request cannot join another's plan), and a graph on
  any other route is refused.
* ``GET /nnterp/spec``: the served model's description (`ModelSpec`), identity and limits.
* ``POST /nnterp/validate``: a graph (and prompts, sampling) checked, nothing run.
* ``POST /nnterp/run``: ``nnterp.dsl.run`` on the served engine; the `RunResult` as one
  safetensors document (`nnterp.dsl.results.result_to_bytes`).

Refusals are JSON in the OpenAI error form, with every problem (`problem_body`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import pickle
import uuid
from typing import Any

import attrs

from nnterp.serve.limits import ServeLimits
from nnterp.serve.requests import RequestProblem, problem_body, read_graph, read_run_request

__all__ = ["ServerState", "NnterpGate", "COMPLETION_PATHS", "RESULT_TYPE", "spec_document"]

COMPLETION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
#: the routes whose bodies reach vLLM's sampling: a graph rides on the first two; on the
#: others, and on every one, a tag a client wrote itself is removed
PARSED_PATHS = COMPLETION_PATHS | {"/v1/responses", "/v1/messages", "/invocations", "/inference/v1/generate",
                                   "/v1/completions/render", "/v1/chat/completions/render"}
#: what answers without a key
OPEN_PATHS = frozenset({"/health", "/metrics", "/ping"})
#: the content type of ``/nnterp/run``'s reply
RESULT_TYPE = "application/vnd.nnterp.result+safetensors"


@attrs.define
class ServerState:
    """What the routes need: the engine, the served model's description, the limits and
    the API keys (sha256 digests; none: no key asked)."""

    engine: Any
    model: Any  # `nnterp.serve.engine_model.EngineModel`
    limits: ServeLimits
    key_digests: tuple[bytes, ...] = ()


def spec_document(spec: Any) -> dict:
    """A `ModelSpec` as JSON (`nnterp.remote.spec_from_document` reads it back): sets as
    sorted lists, site kinds by name."""
    document = {}
    for name, value in attrs.asdict(spec, recurse=False).items():
        if name == "supported":  # follows from the backend
            continue
        if isinstance(value, (set, frozenset)):
            value = sorted(getattr(item, "value", item) for item in value)
        document[name] = value
    return document


class _DuplicateKey(ValueError):
    pass


def _strict(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object that names no key twice (``json.loads`` keeps the last silently;
    nnterp's graph loader refuses a document that does, and so does the server)."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)
    return dict(pairs)


def parse_body(body: bytes) -> Any:
    """A request body as JSON, refusing duplicate keys.

    Raises:
        RequestProblem: 400, not JSON or a key given twice.
    """
    try:
        return json.loads(body, object_pairs_hook=_strict)
    except _DuplicateKey as err:
        raise RequestProblem(400, [{"where": "body", "what": f"the key {str(err)!r} appears more than once in an "
                                    "object", "fix": "give each key once"}]) from None
    except RecursionError:
        raise RequestProblem(400, [{"where": "body", "what": "JSON nested too deeply to read",
                                    "fix": "send a graph document as nnterp.dsl writes it"}]) from None
    except ValueError as err:
        raise RequestProblem(400, [{"where": "body", "what": f"not JSON ({err})", "fix": "send a JSON object"}]) from None


async def _read_body(scope: dict, receive: Any, cap: int) -> bytes | None:
    """The whole body, or None when it is (or says it is) over ``cap`` bytes."""
    declared = dict(scope.get("headers") or []).get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        return None
    body, more = bytearray(), True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return b""
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if len(body) > cap:
            return None
    return bytes(body)


async def _reply(send: Any, status: int, body: bytes, content_type: str = "application/json") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _refuse(send: Any, error: RequestProblem) -> None:
    await _reply(send, error.status, json.dumps(problem_body(error)).encode())


class NnterpGate:
    """The ASGI middleware (see the module's docstring)."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state
        #: run requests worked on at once (`ServeLimits.concurrent_runs`)
        self.runs = asyncio.Semaphore(state.limits.concurrent_runs)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # with keys, every route asks for one but the probes a load balancer sends
        if path not in OPEN_PATHS and not self._authorized(scope):
            return await _refuse(send, RequestProblem(401, [{"where": "Authorization", "what": "missing or wrong "
                                                             "API key", "fix": "send 'Authorization: Bearer KEY'"}]))
        if path.startswith("/nnterp/"):
            return await self._nnterp(scope, receive, send)
        if scope["method"] == "POST" and path in PARSED_PATHS:
            return await self._completion(scope, receive, send)
        return await self.app(scope, receive, send)

    def _authorized(self, scope: dict) -> bool:
        if not self.state.key_digests:
            return True
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        return any(digest == key for key in self.state.key_digests)

    # -- completions with a graph ----------------------------------------------------------

    async def _completion(self, scope: dict, receive: Any, send: Any) -> None:
        limits = self.state.limits
        body = await _read_body(scope, receive, limits.document_bytes + 4 * 2**20)
        if body is None:
            return await _refuse(send, RequestProblem(413, [{"where": "body", "what": "the request body is over "
                                                             f"the server's limit of {limits.document_bytes:,} bytes "
                                                             "(plus 4 MiB for the rest)", "fix": "send a smaller graph"}]))
        plan_id, rows = None, 0
        try:
            data = parse_body(body) if body else None
        except RequestProblem as error:  # what nnterp cannot read exactly, vLLM does not get
            return await _refuse(send, error)
        if isinstance(data, dict):
            extra = data.get("vllm_xargs")
            if isinstance(extra, dict) and "nnterp" in extra:  # nobody joins another's plan
                data["vllm_xargs"] = {k: v for k, v in extra.items() if k != "nnterp"}
            if "nnterp" in data:
                if scope["path"] not in COMPLETION_PATHS:
                    return await _refuse(send, RequestProblem(400, [{
                        "where": "nnterp", "what": f"graphs ride on {' and '.join(sorted(COMPLETION_PATHS))}, "
                                                   f"not on {scope['path']}",
                        "fix": "send the request to /v1/completions or /v1/chat/completions, or to /nnterp/run"}]))
                try:
                    plan_id, rows = await self._install(data)
                except RequestProblem as error:
                    return await _refuse(send, error)
            body = json.dumps(data).encode()
        scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k != b"content-length"]
                     + [(b"content-length", str(len(body)).encode())])
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            await self.app(scope, replay, send)
        finally:
            if plan_id is not None:  # the response is over: the plan goes, whatever happened
                try:
                    await self.state.engine.collective_rpc("nnterp_collect", args=([plan_id],))
                finally:
                    self.state.model.rows.release(rows)

    async def _install(self, data: dict) -> tuple[str, int]:
        """Check, lower and install the graph of a completion: its plan's id and the
        vector rows reserved for it (given back once the plan is collected)."""
        from nnterp.dsl.lowering import lower
        from nnterp.dsl.rules import plan_vector_rows_bound

        limits, model = self.state.limits, self.state.model
        options = data.pop("nnterp")
        if not isinstance(options, dict) or set(options) != {"graph"}:
            raise RequestProblem(400, [{"where": "nnterp", "what": 'must be {"graph": <graph document>}',
                                        "fix": 'send extra_body={"nnterp": {"graph": json.loads(graph.to_json())}}'}])
        # the count vLLM will use: chat prefers max_completion_tokens; none given would
        # be the rest of the context, so the server's limit is written in
        field = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
        requested = data.get(field)
        if requested is None:
            requested = data[field] = limits.max_tokens
        if not isinstance(requested, int) or isinstance(requested, bool) or requested < 1:
            raise RequestProblem(400, [{"where": field, "what": "must be a positive int", "fix": "e.g. 16"}])
        if requested > limits.max_tokens:
            raise RequestProblem(413, [{"where": field, "what": f"{requested} is over the server's limit of "
                                        f"{limits.max_tokens}", "fix": "ask for fewer tokens"}])
        if data.get("use_beam_search"):
            raise RequestProblem(400, [{"where": "use_beam_search", "what": "beam search does not carry a graph",
                                        "fix": "sample or decode greedily with a graph"}])
        prompts = data.get("prompt")
        def count(value: Any) -> int:
            return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1

        sequences = (len(prompts) if isinstance(prompts, list) and prompts and not isinstance(prompts[0], int) else 1) \
            * max(count(data.get("n")), count(data.get("best_of")))
        if sequences > limits.prompts:
            raise RequestProblem(413, [{"where": "n", "what": f"{sequences} sequences (prompts x n), over the server's "
                                        f"limit of {limits.prompts}", "fix": "ask for fewer"}])

        def check() -> Any:
            graph = read_graph(options["graph"], model.spec, limits, where="nnterp.graph", edits_only=True)
            return lower(graph, model.spec, max_tokens=requested)

        plan = await asyncio.to_thread(check)
        # a full table makes the request wait for rows, not fail in the engine's step; a
        # plan whose bound is the whole table (validation checked it fits) runs alone
        rows = min(plan_vector_rows_bound(plan), model.rows.rows)
        await model.rows.acquire(rows)
        plan_id = f"serve-{uuid.uuid4().hex}"
        try:
            await self.state.engine.collective_rpc("nnterp_install", args=([(plan_id, pickle.dumps(plan))],))
        except BaseException:
            model.rows.release(rows)
            raise
        extra = data.get("vllm_xargs") if isinstance(data.get("vllm_xargs"), dict) else {}
        data["vllm_xargs"] = {**extra, "nnterp": [plan_id, 0]}
        return plan_id, rows

    # -- /nnterp -------------------------------------------------------------------------

    async def _nnterp(self, scope: dict, receive: Any, send: Any) -> None:
        path, method = scope["path"], scope["method"]
        model, limits = self.state.model, self.state.limits
        if path == "/nnterp/spec" and method == "GET":
            document = {"spec": spec_document(model.spec), "model": model.identity(), "limits": attrs.asdict(limits)}
            return await _reply(send, 200, json.dumps(document).encode())
        if path not in ("/nnterp/run", "/nnterp/validate") or method != "POST":
            return await _refuse(send, RequestProblem(404, [{"where": path, "what": f"no route {method} {path}",
                                                             "fix": "GET /nnterp/spec, POST /nnterp/run or "
                                                                    "POST /nnterp/validate"}]))
        content_type = dict(scope.get("headers") or []).get(b"content-type", b"").split(b";")[0].strip()
        if content_type != b"application/json":  # a web page cannot send one without asking first
            return await _refuse(send, RequestProblem(415, [{"where": "Content-Type", "what": "must be "
                                                             "application/json", "fix": "send JSON"}]))
        body = await _read_body(scope, receive, limits.document_bytes + 4 * 2**20)
        if body is None:
            return await _refuse(send, RequestProblem(413, [{"where": "body", "what": "the request body is over the "
                                                             "server's limit", "fix": "send a smaller request"}]))
        try:
            data = parse_body(body)
        except RequestProblem as error:
            return await _refuse(send, error)
        try:
            graph, prompts, sampling = await asyncio.to_thread(read_run_request, data, model.spec, limits, model)
        except RequestProblem as error:
            return await _refuse(send, error)
        if path == "/nnterp/validate":
            return await _reply(send, 200, json.dumps({"ok": True, "problems": []}).encode())
        async with self.runs:  # the rest wait their turn, checked already
            return await self._run(send, graph, prompts, sampling)

    async def _run(self, send: Any, graph: Any, prompts: list[str], sampling: Any) -> None:
        from nnterp.dsl import run
        from nnterp.dsl.results import result_to_bytes
        from nnterp.errors import NnterpError

        def work() -> bytes:
            return result_to_bytes(run(graph, self.state.model, prompts, sampling=sampling))

        try:
            payload = await asyncio.to_thread(work)
        except NnterpError as err:
            return await _refuse(send, RequestProblem(400, [{"where": "run", "what": str(err), "fix": "see the message"}]))
        if len(payload) > self.state.limits.output_bytes:
            return await _refuse(send, RequestProblem(413, [{
                "where": "run", "what": f"the results take {len(payload):,} bytes, over the server's limit of "
                                        f"{self.state.limits.output_bytes:,}",
                "fix": "ask for fewer prompts, positions or reads per request"}]))
        await _reply(send, 200, payload, RESULT_TYPE)
