"""A logit-lens heatmap a person can read at a glance (matplotlib, imported on use).

Rows are layers, first at the bottom as in a residual-stream diagram. With several lens
positions the columns are the prompt's tokens and each cell shows the top token at that
layer and position; with one position the columns are the top-k ranks. The colour is
the probability, and every cell is annotated with its token.
"""

from __future__ import annotations

from typing import Any

__all__ = ["plot_lens"]


def plot_lens(lens: Any, tokenizer, path: str, title: str = "", column_labels: list[str] | None = None,
              top: int = 5) -> str:
    """Draw one prompt's lens to ``path`` (PNG).

    Args:
        lens: one prompt's lens: probabilities ``[layers, vocab]`` or ``[layers, k, vocab]``,
            or a ``(probs, ids)`` pair from a top-k lens (``[layers, top_k]`` or
            ``[layers, k, top_k]``).
        tokenizer: decodes token ids for the annotations.
        path: where to write the image.
        title: the figure title (the prompt, typically).
        column_labels: labels of the positions, for a multi-position lens.
        top: how many ranks to show for a single-position lens.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(lens, tuple):
        probs, ids = lens
    else:
        probs, ids = lens.float().topk(top, dim=-1)
    probs, ids = probs.float(), ids
    if probs.ndim == 3:  # [layers, positions, k]: best token per position
        values, tokens = probs[..., 0], ids[..., 0]
        xlabels = column_labels or [str(i) for i in range(values.shape[1])]
        xtitle = "position"
    else:  # [layers, k]: ranks
        values, tokens = probs[:, :top], ids[:, :top]
        xlabels = [f"top {k + 1}" for k in range(values.shape[1])]
        xtitle = "rank"
    n_layers, n_columns = values.shape
    figure, axes = plt.subplots(figsize=(1.6 + 1.25 * n_columns, 1.2 + 0.28 * n_layers))
    image = axes.imshow(values.numpy(), origin="lower", aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    for layer in range(n_layers):
        for column in range(n_columns):
            shown = repr(tokenizer.decode(int(tokens[layer, column])))[1:-1]  # \n, \t visible
            shown = shown if shown.strip() else "\u2423" * len(shown)  # a blank token is a space
            shade = "black" if values[layer, column] > 0.6 else "white"
            axes.text(column, layer, shown[:10], ha="center", va="center", fontsize=7, color=shade)
    axes.set_xticks(range(n_columns), xlabels, rotation=30 if probs.ndim == 3 else 0, fontsize=8)
    axes.set_yticks(range(n_layers), [str(layer) for layer in range(n_layers)], fontsize=7)
    axes.set_xlabel(xtitle)
    axes.set_ylabel("layer")
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, label="probability", fraction=0.05)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def lens_for_plot(result: Any) -> tuple[str, Any, Any] | None:
    """The first lens of a `RunResult`: its name, its output and its ``positions``
    (as recorded in the manifest), or ``None`` if the graph has no lens."""
    for node in result.manifest["graph"]["graph"]:
        if node.get("op") == "lens":
            name = node.get("name", "lens")
            return name, result[name], node.get("positions", -1)
    return None
