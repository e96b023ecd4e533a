"""``nnterp serve`` as real clients use it: the real server on the bundled model, on the
CPU, on a loopback port, driven by the official ``openai`` client and by nnterp's own.

Steered completions (plain, streamed, chat) must equal a local run of the same graph;
the run endpoint must return what a local run returns; concurrent clients with
different graphs must each get their own answer; hostile requests must each get a 4xx
and leave the server serving; SIGTERM must stop it and leave no process behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch

from nnterp.dsl import Graph, Lens, Patch, Read, Sampling, Steer, Zero, ValidationError, run, validate
from test_dsl_run import _compare

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

KEY = "test-key-123"
PROMPT = "The capital of France is"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    pytest.importorskip("vllm")
    openai = pytest.importorskip("openai")
    psutil = pytest.importorskip("psutil")
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "nnterp", "serve", "bundled", "--port", str(port),
                                "--api-key", KEY], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited: {process.stdout.read()[-3000:]}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        process.kill()
        pytest.fail("the server did not start in 300 s")
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    yield {"url": url, "process": process, "client": client, "model": client.models.list().data[0].id,
           "psutil": psutil}
    if process.poll() is None:  # a test failed before the SIGTERM one: stop the whole tree
        tree = psutil.Process(process.pid).children(recursive=True) + [psutil.Process(process.pid)]
        for member in tree:
            member.kill()
        psutil.wait_procs(tree, timeout=30)


def _london(model) -> Graph:
    london = model.tokenizer(" London", add_special_tokens=False)["input_ids"][0]
    direction = model.weight("unembedding")[london]
    return Graph([Steer(25, direction / direction.norm(), scale=90.0)])


def _extra(graph: Graph) -> dict:
    return {"nnterp": {"graph": json.loads(graph.to_json())}}


def test_it_listens_on_loopback_only_and_asks_for_the_key(server):
    connections = server["psutil"].Process(server["process"].pid).net_connections(kind="tcp")
    listening = [c.laddr.ip for c in connections if c.status == "LISTEN"]
    assert listening and set(listening) == {"127.0.0.1"}
    for path, body in (("/v1/completions", {"model": server["model"], "prompt": "x"}), ("/nnterp/run", {})):
        request = urllib.request.Request(server["url"] + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 401


def test_the_openai_client_gets_steered_completions_equal_to_a_local_run(server, vllm_models):
    local = vllm_models("bundled")
    graph, client, name = _london(local), server["client"], server["model"]
    want = run(graph, local, [PROMPT], sampling=Sampling(max_tokens=6)).texts[0]
    got = client.completions.create(model=name, prompt=PROMPT, max_tokens=6, temperature=0, extra_body=_extra(graph))
    assert got.choices[0].text == want and "London" in want
    plain = client.completions.create(model=name, prompt=PROMPT, max_tokens=6, temperature=0)
    assert plain.choices[0].text == run(Graph([]), local, [PROMPT], sampling=Sampling(max_tokens=6)).texts[0]
    streamed = client.completions.create(model=name, prompt=PROMPT, max_tokens=6, temperature=0, stream=True,
                                         extra_body=_extra(graph))
    assert "".join(chunk.choices[0].text for chunk in streamed) == want
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    templated = local.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for stream in (False, True):
        chat = client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0,
                                              stream=stream, extra_body=_extra(graph))
        text = ("".join(chunk.choices[0].delta.content or "" for chunk in chat) if stream
                else chat.choices[0].message.content)
        assert text == run(graph, local, [templated], sampling=Sampling(max_tokens=8)).texts[0]


def test_the_run_endpoint_returns_what_a_local_run_returns(server, vllm_models):
    from nnterp.remote import RemoteModel

    local = vllm_models("bundled")
    graph = _london(local) >> Read("layers[26].output", positions=[0, -1]) >> Lens(top_k=5, layers=[0, 29])
    prompts = [PROMPT, "Hello there"]
    remote = RemoteModel(server["url"], api_key=KEY)
    got, want = remote.run(graph, prompts, Sampling(max_tokens=3)), run(graph, local, prompts,
                                                                         sampling=Sampling(max_tokens=3))
    assert got.keys() == want.keys() and got.tokens == want.tokens and got.texts == want.texts
    for name in want.keys():
        _compare(got[name], want[name], name)
    assert got.manifest["graph_digest"] == graph.digest() and got.manifest["model"] == local.identity()
    assert remote.spec().num_layers == local.num_layers and remote.validate(graph, prompts).vocab_size == 49152
    with pytest.raises(ValidationError, match=r"layers\[40\]"):
        remote.validate(Read("layers[40].output"))


def test_concurrent_clients_with_different_graphs_each_get_their_own_answer(server, vllm_models):
    local = vllm_models("bundled")
    client, name = server["client"], server["model"]
    graphs = {"steered": _london(local), "zeroed": Graph([Zero("layers[20].output", positions=[-1])]), "plain": None}
    want = {key: run(graph or Graph([]), local, [PROMPT], sampling=Sampling(max_tokens=5)).texts[0]
            for key, graph in graphs.items()}
    assert len(set(want.values())) == 3
    got: dict[str, list[str]] = {key: [] for key in graphs}

    def ask(key: str) -> None:
        for _ in range(3):
            extra = _extra(graphs[key]) if graphs[key] is not None else None
            reply = client.completions.create(model=name, prompt=PROMPT, max_tokens=5, temperature=0,
                                              extra_body=extra)
            got[key].append(reply.choices[0].text)

    threads = [threading.Thread(target=ask, args=(key,)) for key in graphs for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for key in graphs:
        assert got[key] == [want[key]] * 6, key


def test_requests_whose_edits_overfill_the_vector_table_wait_their_turn_and_get_their_answer(server, vllm_models):
    """Three patches of 120 rows each, at once: 360 rows of a 255-row table. Installed
    together they would run out of rows in the engine's step (every client's); the server
    holds the third until rows are free, and every answer equals a local run."""
    local = vllm_models("bundled")
    client, name = server["client"], server["model"]
    prompt = " ".join(["river", "stone", "cloud"] * 50)
    positions = list(range(2, 122))
    generator = torch.Generator().manual_seed(3)
    graphs = [Graph([Patch("layers[12].output", value=8 * torch.randn(len(positions), local.hidden_size,
                                                                      generator=generator), positions=positions)])
              for _ in range(3)]
    want = [run(graph, local, [prompt], sampling=Sampling(max_tokens=4)).texts[0] for graph in graphs]
    assert len(set(want)) > 1  # the patches differ in what they make
    got: list = [None] * 3

    def ask(i: int) -> None:
        got[i] = client.completions.create(model=name, prompt=prompt, max_tokens=4, temperature=0,
                                           extra_body=_extra(graphs[i])).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert got == want
    plain = client.completions.create(model=name, prompt=PROMPT, max_tokens=2, temperature=0)
    assert plain.choices[0].text == run(Graph([]), local, [PROMPT], sampling=Sampling(max_tokens=2)).texts[0]


def _loader_corpus() -> list:
    """``MALFORMED`` of tests/dsl/test_serialize.py: documents the loader must refuse."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent / "dsl" / "test_serialize.py"
    spec = importlib.util.spec_from_file_location("loader_corpus", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MALFORMED


def _post(server, path, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server["url"] + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, {}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_hostile_requests_get_a_4xx_and_the_server_keeps_serving(server, vllm_models, monkeypatch):
    local = vllm_models("bundled")
    name = server["model"]
    import base64

    steer = {"op": "steer", "layer": 0, "vector": {"dtype": "float32", "shape": [576], "data": ""}}  # no bytes
    huge = json.loads(Graph([Steer(3, torch.ones(3 * 2**19))]).to_json())  # 6 MiB of tensor
    many = {"nnterp_dsl": 1, "graph": [{"op": "zero", "site": "layers[0].output", "positions": [0]}] * 10_000}
    documents = {
        "not an object": "Steer(5)",
        "unknown op": {"nnterp_dsl": 1, "graph": [{"op": "os.system", "args": ["rm -rf /"]}]},
        "python object": {"nnterp_dsl": 1, "graph": [{"op": "read", "site": {"__class__": "subprocess.Popen"}}]},
        "newer format": {"nnterp_dsl": 99, "graph": []},
        "bad tensor": {"nnterp_dsl": 1, "graph": [steer]},
        "unknown site": {"nnterp_dsl": 1, "graph": [{"op": "zero", "site": "layers[3].secret"}]},
        "layer out of range": {"nnterp_dsl": 1, "graph": [{"op": "zero", "site": "layers[30].output"}]},
        "a read on a completion": {"nnterp_dsl": 1, "graph": [{"op": "read", "site": "logits"}]},
        "oversize tensor": huge,
        "10,000 nodes": many,
    }
    nan = torch.full((576,), float("nan")).numpy().tobytes()
    documents["NaN vector"] = {"nnterp_dsl": 1, "graph": [{"op": "steer", "layer": 3, "vector": {
        "dtype": "float32", "shape": [576], "data": base64.b64encode(nan).decode()}}]}
    # the loader tests' corpus of malformed documents, each verbatim as a request's graph
    # (duplicate keys included), or as a string where it is not JSON at all
    for index, (text, _) in enumerate(_loader_corpus()):
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        try:
            json.loads(text)
            inner = text
        except RecursionError:  # nested past Python's limit: the server must cope with it as written
            inner = text
        except ValueError:
            inner = json.dumps(text)
        for path, head in (("/v1/completions", f'{{"model": "{name}", "prompt": "x", "max_tokens": 2, '),
                           ("/nnterp/run", '{"prompts": ["x"], ')):
            status, body = _post(server, path, (head + f'"nnterp": {{"graph": {inner}}}}}').encode()
                                 if path == "/v1/completions" else (head + f'"graph": {inner}}}').encode())
            assert 400 <= status < 500 and body["error"]["problems"], (index, path, text)
    for what, document in documents.items():
        status, body = _post(server, "/v1/completions", {"model": name, "prompt": PROMPT, "max_tokens": 2,
                                                         "nnterp": {"graph": document}})
        assert 400 <= status < 500, what
        assert body["error"]["problems"], what
        if what != "a read on a completion":  # which /nnterp/run is for
            status, _ = _post(server, "/nnterp/run", {"graph": document, "prompts": [PROMPT]})
            assert 400 <= status < 500, what
    assert _post(server, "/v1/completions", {"model": name, "prompt": PROMPT, "max_tokens": 2,
                                             "nnterp": {"graph": many}})[0] == 413
    assert _post(server, "/nnterp/run", {"graph": {"nnterp_dsl": 1, "graph": []}, "prompts": ["x"] * 5000})[0] == 413
    assert _post(server, "/nnterp/run", {"graph": {"nnterp_dsl": 1, "graph": []}, "prompts": [PROMPT],
                                         "sampling": {"max_tokens": 10**6}})[0] == 413
    assert _post(server, "/nnterp/run", b"{not json")[0] == 400
    # bodies nnterp cannot read exactly never reach vLLM: a key given twice, an escaped tag
    status, _ = _post(server, "/invocations", ('{"model": "%s", "model": "%s", "prompt": "x", '
                                               '"vllm_xargs": {"\\u006enterp": 7}}' % (name, name)).encode())
    assert status == 400
    request = urllib.request.Request(server["url"] + "/nnterp/run", data=b'{"prompts": ["x"]}', method="POST",
                                     headers={"Content-Type": "text/plain", "Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 415
    zero_far = {"nnterp_dsl": 1, "graph": [{"op": "zero", "site": "layers[0].output", "positions": [-10**21]}]}
    two_rows = json.loads(Graph([__import__("nnterp.dsl", fromlist=["Patch"]).Patch(
        "layers[0].output", value=torch.ones(2, 576))]).to_json())
    for document in (zero_far, two_rows):
        status, body = _post(server, "/v1/completions", {"model": name, "prompt": PROMPT, "max_tokens": 2,
                                                         "nnterp": {"graph": document}})
        assert status == 400 and body["error"]["problems"], document
    status, _ = _post(server, "/v1/chat/completions", {
        "model": name, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1,
        "max_completion_tokens": 10**6, "nnterp": {"graph": {"nnterp_dsl": 1, "graph": []}}})
    assert status == 413
    # graphs ride on the two completion routes only
    status, body = _post(server, "/v1/responses", {"model": name, "input": PROMPT,
                                                   "nnterp": {"graph": {"nnterp_dsl": 1, "graph": []}}})
    assert status == 400 and "graphs ride on" in body["error"]["message"]
    # a client's own tag is removed: it cannot join another request's plan
    status, _ = _post(server, "/v1/completions", {"model": name, "prompt": PROMPT, "max_tokens": 3,
                                                  "vllm_xargs": {"nnterp": ["serve-someone-else", 0]}})
    assert status == 200
    # still serving, and still right
    reply = server["client"].completions.create(model=name, prompt=PROMPT, max_tokens=6, temperature=0,
                                                extra_body=_extra(_london(local)))
    assert reply.choices[0].text == run(_london(local), local, [PROMPT], sampling=Sampling(max_tokens=6)).texts[0]
    monkeypatch.setenv("NNTERP_API_KEY", KEY)
    assert validate(Read("layers[3].output"), server["url"]).backend == "vllm"


def test_a_bounded_load_of_concurrent_clients(server, vllm_models):
    """Four clients for four seconds, steered and plain mixed: every request answered;
    requests/s and latencies printed (the H200 comparison with vanilla `vllm serve`
    lives in benchmarks/serve_load.py)."""
    local = vllm_models("bundled")
    client, name, graph = server["client"], server["model"], _london(local)
    latencies: list[float] = []
    failures: list[str] = []
    stop = time.time() + 4

    def load(steered: bool) -> None:
        while time.time() < stop:
            start = time.perf_counter()
            try:
                client.completions.create(model=name, prompt=PROMPT, max_tokens=4, temperature=0,
                                          extra_body=_extra(graph) if steered else None)
                latencies.append(time.perf_counter() - start)
            except Exception as err:  # counted, and the test fails below
                failures.append(repr(err))

    threads = [threading.Thread(target=load, args=(i % 2 == 0,)) for i in range(4)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    elapsed = time.perf_counter() - began
    assert not failures and latencies
    ordered = sorted(latencies)
    print(f"\n[serve load] {len(ordered)} requests in {elapsed:.1f} s: {len(ordered) / elapsed:.1f} req/s, "
          f"p50 {statistics.median(ordered) * 1000:.0f} ms, p99 {ordered[int(0.99 * (len(ordered) - 1))] * 1000:.0f} ms")


def test_sigterm_stops_the_server_and_leaves_no_process(server):
    psutil, process = server["psutil"], server["process"]
    children = psutil.Process(process.pid).children(recursive=True)
    assert children  # the engine core runs in a process of its own
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(timeout=90) is not None
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.pid for p in alive]
