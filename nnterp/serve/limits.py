"""What one request may ask of the server, with the defaults ``nnterp serve`` uses."""

from __future__ import annotations

import attrs

__all__ = ["ServeLimits"]


def _positive(instance: object, attribute: attrs.Attribute, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ServeLimits.{attribute.name} must be a positive int, got {value!r}")


@attrs.frozen
class ServeLimits:
    """Bounds on one request; each is a flag of ``nnterp serve`` (``--max-...``).

    Args:
        document_bytes: size of a request body (a graph's tensors travel inline).
        nodes: nodes in one graph.
        tensor_bytes: bytes of all the tensors of one request's graph, decoded.
        prompts: prompts in one run request.
        max_tokens: tokens one request may generate.
        output_bytes: bytes of one run's results as sent back.
        concurrent_runs: ``/nnterp/run`` requests worked on at once; more wait their
            turn. Each holds its results in the server's memory until they are sent
            (up to ``output_bytes``), so this bounds that memory. Completions are not
            counted: vLLM batches them as it does any request.
    """

    document_bytes: int = attrs.field(default=8 * 2**20, validator=_positive)
    nodes: int = attrs.field(default=256, validator=_positive)
    tensor_bytes: int = attrs.field(default=4 * 2**20, validator=_positive)
    prompts: int = attrs.field(default=1024, validator=_positive)
    max_tokens: int = attrs.field(default=4096, validator=_positive)
    output_bytes: int = attrs.field(default=512 * 2**20, validator=_positive)
    concurrent_runs: int = attrs.field(default=4, validator=_positive)
