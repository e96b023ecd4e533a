"""Serving load (issue 22): ``nnterp serve`` with mixed steered and plain traffic against
vanilla ``vllm serve`` with no graphs, at the same concurrency.

Each server runs in a process of its own, on a loopback port, started with the same
engine settings; ``--clients`` OpenAI clients send completions for ``--seconds`` (after a
warm-up), each ``--max-tokens`` tokens, greedy, with ``ignore_eos`` so that every request
generates the same number of tokens. On ``nnterp serve`` every other client sends a
steering graph. Reported: requests/s, generated tokens/s, p50 and p99 latency, and the
ratio of tokens/s (target on an H200 at 1.1B: 0.85).

Run: ``python -m benchmarks.serve_load --model bundled`` (CPU, a minute or two) or
``--model /path/to/1.1B --clients 64 --seconds 60`` on a GPU host.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError("the server did not start")


def _engine_flags(path: str) -> list[str]:
    import torch

    if torch.cuda.is_available():
        return ["--no-enable-prefix-caching"]
    from nnterp.backends.vllm_cpu import DEFAULT_KV_CACHE_BYTES

    return ["--dtype", "float32", "--kv-cache-memory-bytes", str(DEFAULT_KV_CACHE_BYTES), "--max-model-len", "2048",
            "--enforce-eager", "--no-enable-prefix-caching"]


def serve_vanilla(path: str, port: int) -> None:
    """vLLM's own OpenAI server, built in-process from the same vLLM functions ``nnterp
    serve`` uses, with no nnterp worker, hooks or gate (vllm-cpu ships no ``vllm``
    package metadata, which its ``vllm`` command reads)."""
    import uvloop

    from nnterp.serve.server import _vllm_server

    async def main() -> None:
        vllm = _vllm_server()
        args = vllm["make_arg_parser"](vllm["parser"]()).parse_args(
            ["--model", path, "--host", "127.0.0.1", "--port", str(port), *_engine_flags(path)])
        vllm["validate"](args)
        _, sock = vllm["setup_server"](args, reuse_port=False)
        async with vllm["build_async_engine_client"](args) as engine:
            tasks = await engine.get_supported_tasks()
            app = vllm["build_app"](args, tasks, engine.model_config)
            await vllm["init_app_state"](engine, app.state, args, tasks)
            shutdown = await vllm["serve_http"](app, sock=sock, host=args.host, port=args.port,
                                                log_level="warning", access_log=False)
        await shutdown

    uvloop.run(main())


def load(url: str, clients: int, seconds: float, max_tokens: int, graph: dict | None, prompt: str) -> dict:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    name = client.models.list().data[0].id
    latencies: list[float] = []
    tokens = [0]
    failures: list[str] = []

    def ask(steered: bool) -> float:
        start = time.perf_counter()
        extra = {"ignore_eos": True}
        if steered:
            extra["nnterp"] = {"graph": graph}
        reply = client.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                          extra_body=extra)
        tokens[0] += reply.usage.completion_tokens
        return time.perf_counter() - start

    for steered in (False, True) if graph else (False,):  # warm-up
        ask(steered)
    tokens[0] = 0
    stop = time.time() + seconds

    def worker(i: int) -> None:
        while time.time() < stop:
            try:
                latencies.append(ask(graph is not None and i % 2 == 0))
            except Exception as err:
                failures.append(repr(err))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    ordered = sorted(latencies)
    return {"requests": len(ordered), "failures": len(failures), "seconds": elapsed,
            "requests_per_s": len(ordered) / elapsed, "tokens_per_s": tokens[0] / elapsed,
            "p50_ms": statistics.median(ordered) * 1000, "p99_ms": ordered[int(0.99 * (len(ordered) - 1))] * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--serve-vanilla", nargs=2, metavar=("PATH", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_vanilla:
        serve_vanilla(args.serve_vanilla[0], int(args.serve_vanilla[1]))
        return
    import torch
    import transformers

    from benchmarks.throughput import _wait_for_gpu_memory
    from nnterp.bundled import find_loadable
    from nnterp.dsl import Graph, Steer

    path = os.fspath(find_loadable(args.model))
    config = transformers.AutoConfig.from_pretrained(path)  # the shapes; no weights in this process
    vector = torch.randn(config.hidden_size, generator=torch.Generator().manual_seed(0))
    graph = json.loads(Graph([Steer(config.num_hidden_layers // 2, 4 * vector / vector.norm())]).to_json())
    prompt = "The capital of France is"
    rows = {}
    env = dict(os.environ, VLLM_USE_V2_MODEL_RUNNER="0")
    logs = args.out / "serve-load-logs"
    logs.mkdir(parents=True, exist_ok=True)
    # the server under test first: if it cannot start, the run stops before the reference
    for system in ("nnterp serve", "vllm serve"):
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        if system == "vllm serve":
            command = [sys.executable, "-m", "benchmarks.serve_load", "--serve-vanilla", path, str(port)]
        else:
            command = [sys.executable, "-m", "nnterp", "serve", args.model, "--port", str(port)]
        log = logs / f"{system.split()[0]}.log"
        with log.open("w") as sink:
            process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
        started = time.perf_counter()
        try:
            _wait(url, process)
            print(f"[serve-load] {system} up in {time.perf_counter() - started:.0f} s", flush=True)
            rows[system] = load(url, args.clients, args.seconds, args.max_tokens,
                                graph if system == "nnterp serve" else None, prompt)
            print(f"[serve-load] {system}: {rows[system]}", flush=True)
        except Exception:
            print(f"[serve-load] {system} failed; the last lines of {log}:", flush=True)
            print("".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:]), flush=True)
            raise
        finally:
            process.terminate()
            process.wait(timeout=120)
            _wait_for_gpu_memory(timeout=120)  # the next server takes the same share
    ratio = rows["nnterp serve"]["tokens_per_s"] / rows["vllm serve"]["tokens_per_s"]
    print(f"tokens/s, nnterp serve (half steered) / vllm serve (no graphs): {ratio:.3f} (target on an H200: 0.85)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve-load.json").write_text(json.dumps({"rows": rows, "ratio": ratio, "clients": args.clients,
                                                          "max_tokens": args.max_tokens}, indent=1))


if __name__ == "__main__":
    main()
