"""``nnterp serve``: one engine, many researchers, interventions as data.

A graph is plain data: a bounded JSON document, read by a loader that never imports or
executes anything it names, validated against the model before the engine sees it. That
makes it safe to take over a network. The server runs one vLLM engine with nnterp's
executor inside, and serves on it:

* vLLM's own OpenAI-compatible API (``/v1/completions``, ``/v1/chat/completions``,
  streaming included), where a request may carry ``"nnterp": {"graph": ...}``: the graph
  steers, zeroes or patches that request alone;
* ``POST /nnterp/run``: a graph, prompts and sampling in, the `RunResult` out as one
  safetensors document; ``GET /nnterp/spec`` describes the model, so a client validates
  without running anything (both in `nnterp.serve.routes`).

Requests with different graphs share the engine's batches: each installs its own plan in
the multi-plan executor. What a request may ask for is bounded (`ServeLimits`); a request
past a limit, or whose graph does not validate, gets HTTP 413 or 400 naming every
problem, and the engine never sees it.

Layout: `limits` (the bounds), `requests` (a request's graph, checked), `engine_model`
(the DSL's model interface over the asynchronous engine), `routes` (the gate in front
of vLLM's app, and the ``/nnterp`` routes), `server` (engine, app, keys, shutdown). The
client side is `nnterp.remote`.
"""
