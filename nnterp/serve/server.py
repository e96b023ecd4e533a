"""Start the server: one engine with nnterp's executor, vLLM's app, nnterp's gate, uvicorn.

The engine is vLLM's asynchronous one, built from vLLM's own server arguments, with
nnterp's worker class and hook layout added (``worker_cls``, ``additional_config``): on a
GPU the compiled worker that replays CUDA graphs (the residual-stream sites, as
``cuda_graphs=True``), on a CPU the eager one with every site. vLLM builds its app
(the OpenAI-compatible routes, its API-key check); nnterp's gate (`NnterpGate`) is added
inside it, so a caller without a key is refused before a plan is installed. vLLM's app
has built its middleware stack already when it returns it, so the stack is rebuilt.

Safety defaults: the server listens on 127.0.0.1 unless ``host`` is given; prefix
caching is off (a prefix one request's graph edited must not be served to another);
SIGTERM drains the engine for ``shutdown_timeout`` seconds, then stops it and its
processes.
"""

from __future__ import annotations

import hashlib
import os
import signal
from typing import Any, Sequence

import attrs

from nnterp.serve.limits import ServeLimits

__all__ = ["serve"]


def _vllm_server() -> dict[str, Any]:
    """vLLM's server-building functions, by name, wherever this vLLM keeps them (0.32 in
    ``entrypoints.launchers``, 0.26 in ``entrypoints.openai``)."""
    try:
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
        from vllm.entrypoints.launchers.app import build_app
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
        from vllm.entrypoints.launchers.launcher import serve_http, setup_server
    except ImportError:  # vLLM 0.26
        from vllm.entrypoints.launcher import serve_http
        from vllm.entrypoints.openai.api_server import (build_app, build_async_engine_client, init_app_state,
                                                        setup_server)
        from vllm.entrypoints.openai.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return dict(init_app_state=init_app_state, build_async_engine_client=build_async_engine_client,
                build_app=build_app, make_arg_parser=make_arg_parser, validate=validate_parsed_serve_args,
                serve_http=serve_http, setup_server=setup_server, parser=FlexibleArgumentParser)


def _engine_arguments(model: str, path: str, host: str, port: int, dtype: str | None, api_keys: Sequence[str],
                      shutdown_timeout: int, cpu: bool) -> list[str]:
    # clients name the model as the server was given it ("bundled", a hub id, a folder)
    argv = ["--model", path, "--host", host, "--port", str(port), "--no-enable-prefix-caching",
            "--shutdown-timeout", str(shutdown_timeout), "--served-model-name", model]
    if cpu:
        from nnterp.backends.vllm_cpu import DEFAULT_KV_CACHE_BYTES
        from nnterp.backends.vllm_lifecycle import cpu_max_model_len

        argv += ["--dtype", dtype or "float32", "--kv-cache-memory-bytes", str(DEFAULT_KV_CACHE_BYTES),
                 "--max-model-len", str(cpu_max_model_len(path)), "--enforce-eager"]
    elif dtype:
        argv += ["--dtype", dtype]
    for key in api_keys:
        argv += ["--api-key", key]
    return argv


def serve(model: str, *, host: str | None = None, port: int = 8000, dtype: str | None = None,
          api_keys: Sequence[str] = (), limits: ServeLimits | None = None, shutdown_timeout: int = 10,
          log_level: str = "warning") -> None:
    """Serve ``model`` until SIGTERM or SIGINT (`nnterp.serve`; ``python -m nnterp serve``).

    Args:
        model: a model folder, hub name or ``"bundled"``.
        host: the address to listen on; default 127.0.0.1 (loopback only).
        api_keys: keys a client must send (``Authorization: Bearer KEY``); none: no key.
        limits: what one request may ask (`ServeLimits`).
        shutdown_timeout: seconds in-flight requests get to finish on SIGTERM.
    """
    import uvloop

    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    uvloop.run(_serve(model, host or "127.0.0.1", port, dtype, tuple(api_keys), limits or ServeLimits(),
                      shutdown_timeout, log_level))


async def _serve(model: str, host: str, port: int, dtype: str | None, api_keys: tuple[str, ...],
                 limits: ServeLimits, shutdown_timeout: int, log_level: str) -> None:
    import asyncio

    from starlette.middleware import Middleware
    from transformers import AutoTokenizer

    from nnterp.backends.batch_program import HOOKABLE
    from nnterp.backends.internals import CPU_WORKER_CLS, GPU_COMPILED_WORKER_CLS
    from nnterp.backends.vllm_cpu import is_cpu_only
    from nnterp.backends.vllm_settings import CONFIG_KEY, executor_config, graph_site_kinds
    from nnterp.bundled import find_loadable
    from nnterp.dsl.spec import ModelSpec
    from nnterp.serve.engine_model import EngineModel
    from nnterp.serve.routes import NnterpGate, ServerState
    from nnterp.standardized import model_identity

    vllm = _vllm_server()
    path = os.fspath(find_loadable(model))
    cpu = is_cpu_only()
    args = vllm["make_arg_parser"](vllm["parser"]()).parse_args(
        _engine_arguments(model, path, host, port, dtype, api_keys, shutdown_timeout, cpu))
    kinds = HOOKABLE if cpu else tuple(sorted(graph_site_kinds(True), key=HOOKABLE.index))
    args.worker_cls = CPU_WORKER_CLS if cpu else GPU_COMPILED_WORKER_CLS
    args.additional_config = {CONFIG_KEY: executor_config(kinds, None, cpu)}
    args.uvicorn_log_level = log_level
    vllm["validate"](args)

    def interrupted(*_: Any) -> None:  # SIGTERM while the engine starts
        raise KeyboardInterrupt("terminated")

    signal.signal(signal.SIGTERM, interrupted)
    _, sock = vllm["setup_server"](args, reuse_port=False)
    try:
        async with vllm["build_async_engine_client"](args) as engine:
            tasks = await engine.get_supported_tasks()
            hf_config = engine.model_config.hf_config
            spec = attrs.evolve(ModelSpec.from_config(hf_config, "vllm"),
                                max_model_len=int(engine.model_config.max_model_len),
                                served_sites=None if cpu else frozenset(kinds), vector_rows=256)
            state = ServerState(engine, EngineModel(engine, asyncio.get_running_loop(), spec,
                                                    AutoTokenizer.from_pretrained(path),
                                                    # the engine's configuration, as a local vLLM model
                                                    # reports it: a server's manifest is a local run's
                                                    model_identity(model, hf_config)),
                                limits, tuple(hashlib.sha256(k.encode("utf-8")).digest() for k in api_keys))
            app = vllm["build_app"](args, tasks, engine.model_config)
            app.user_middleware.append(Middleware(NnterpGate, state=state))  # innermost: after the key check
            app.middleware_stack = app.build_middleware_stack()
            await vllm["init_app_state"](engine, app.state, args, tasks)
            shutdown = await vllm["serve_http"](app, sock=sock, host=args.host, port=args.port,
                                                log_level=log_level, access_log=False)
        await shutdown
    finally:
        sock.close()
