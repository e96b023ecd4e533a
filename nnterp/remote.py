"""A model served by ``nnterp serve``, used from another process or machine.

``run(graph, "http://host:8000", prompts)`` and `RemoteModel` send the graph, prompts and
sampling to the server's ``POST /nnterp/run`` and return the same `RunResult` a local
run gives (its tensors travel as one safetensors document). ``validate(graph,
"http://host:8000")`` checks a graph against the server's model description
(``GET /nnterp/spec``) without running anything; `RemoteModel.validate` also checks the
prompts and sampling, on the server. Plain HTTP from the standard library: a client needs
neither vLLM nor a GPU.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any, Sequence

from nnterp.dsl.graph import as_graph
from nnterp.dsl.plan import Sampling
from nnterp.dsl.results import RunResult, result_from_bytes
from nnterp.dsl.spec import ModelSpec
from nnterp.errors import NnterpError, ValidationError
from nnterp.sites import SiteKind

__all__ = ["RemoteModel", "RemoteError", "is_url", "spec_from_document", "run_remote"]


class RemoteError(NnterpError, RuntimeError):
    """The server refused a request or could not be reached: the message carries its
    reason (and, for a refused graph, every problem it named)."""

    def __init__(self, message: str, status: int | None = None, problems: Sequence[dict] = ()) -> None:
        super().__init__(message)
        self.status, self.problems = status, list(problems)


def is_url(model: Any) -> bool:
    return isinstance(model, str) and model.startswith(("http://", "https://"))


def spec_from_document(document: dict) -> ModelSpec:
    """The `ModelSpec` a server describes its model with (``GET /nnterp/spec``)."""
    fields = dict(document)
    sites = fields.pop("served_sites", None)
    return ModelSpec(**fields, **({} if sites is None else {"served_sites": frozenset(SiteKind(s) for s in sites)}))


class RemoteModel:
    """A served model: ``run`` and ``validate`` go to the server at ``url``.

    Args:
        url: ``http://host:port`` of ``nnterp serve``.
        api_key: the server's key, when it asks for one; default ``$NNTERP_API_KEY``
            (what ``run(graph, url, ...)`` and ``validate(graph, url)`` use).
        timeout: seconds a request may take.
    """

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        self.url, self.timeout = url.rstrip("/"), timeout
        self.api_key = api_key if api_key is not None else os.environ.get("NNTERP_API_KEY")
        self._spec: ModelSpec | None = None

    def _request(self, method: str, path: str, body: dict | None = None) -> tuple[bytes, str]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            raise _refusal(err) from None
        except (urllib.error.URLError, OSError) as err:
            raise RemoteError(f"cannot reach the nnterp server at {self.url} ({getattr(err, 'reason', err)}); "
                              "is `python -m nnterp serve` running there?") from None

    def spec(self) -> ModelSpec:
        """The served model's description (fetched once)."""
        if self._spec is None:
            body, _ = self._request("GET", "/nnterp/spec")
            self._spec = spec_from_document(json.loads(body)["spec"])
        return self._spec

    def run(self, graph: Any, prompts: str | Sequence[str], sampling: Sampling | None = None) -> RunResult:
        """``run(graph, model, prompts, sampling=...)`` on the server."""
        import attrs

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        body = {"graph": json.loads(as_graph(graph).to_json()), "prompts": prompts,
                "sampling": attrs.asdict(sampling or Sampling())}
        payload, _ = self._request("POST", "/nnterp/run", body)
        return result_from_bytes(payload)

    def validate(self, graph: Any, prompts: Sequence[str] | None = None, sampling: Sampling | None = None) -> ModelSpec:
        """Check ``graph`` (with ``prompts`` and ``sampling``, when given) on the server,
        running nothing.

        Raises:
            ValidationError: the server's problems with the graph.
        """
        import attrs

        body: dict[str, Any] = {"graph": json.loads(as_graph(graph).to_json()),
                                "prompts": list(prompts) if prompts else ["validation"]}
        if sampling is not None:
            body["sampling"] = attrs.asdict(sampling)
        try:
            self._request("POST", "/nnterp/validate", body)
        except RemoteError as err:
            if err.status == 400 and err.problems:
                from nnterp.dsl.problem import Problem

                raise ValidationError([Problem(p["where"], p["what"], p["fix"]) for p in err.problems],
                                      header=f"the server at {self.url} found {len(err.problems)} problem(s):") from None
            raise
        return self.spec()

    def __repr__(self) -> str:
        return f"RemoteModel({self.url!r})"


def _refusal(err: urllib.error.HTTPError) -> RemoteError:
    text = err.read().decode("utf-8", "replace")
    try:
        detail = json.loads(text).get("error", {})
    except ValueError:
        detail = {"message": text[:500]}
    if not isinstance(detail, dict):
        detail = {"message": str(detail)}
    problems = detail.get("problems") or []
    listed = "".join(f"\n  {p['where']}: {p['what']}; fix: {p['fix']}" for p in problems)
    return RemoteError(f"the server refused the request (HTTP {err.code}): {detail.get('message', '')}{listed}",
                       err.code, problems)


def run_remote(graph: Any, url: str, prompts: Any, sampling: Sampling | None) -> Any:
    """``run`` with a server's URL as the model: one graph, or a list of them."""
    model = RemoteModel(url)
    if isinstance(graph, (list, tuple)):
        return [model.run(g, prompts, sampling) for g in graph]
    return model.run(graph, prompts, sampling)


