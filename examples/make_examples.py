"""Regenerate examples/*.json: `python examples/make_examples.py [OUTPUT_FOLDER]`.

OUTPUT_FOLDER defaults to this script's folder. The files are canonical JSON, so
running it again gives byte-identical files (tests/test_examples.py checks this).
"""

import sys
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer

import nnterp
from nnterp.dsl import Graph, Lens, Patch, Read, Source, Steer, save


def london_direction() -> torch.Tensor:
    """The bundled SmolLM2's embedding row of " London", scaled to norm 80 (576 floats)."""
    folder = nnterp.bundled_model_path()
    token_id = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(
        " London", add_special_tokens=False).ids[0]
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        row = weights.get_slice("model.embed_tokens.weight")[token_id].double().reshape(-1)
    # float64 arithmetic then one rounding to float32: the same bytes on every machine
    return (row / row.norm() * 80.0).float()


def graphs() -> dict[str, Graph]:
    return {
        "lens": Graph([Lens(layers="all", top_k=5, name="lens")]),
        "steer_generation": Graph([Steer(25, london_direction()), Read("logits", steps="all")]),
        "activation_patching": Patch("layers[10].output", source=Source("The capital of Italy is"))
        >> Lens(layers=[20, 24, 29]),
        "patchscope": Patch("layers[3].output", positions=-1,
                            source=Source("Paris", site="layers[3].output", position=-1))
        >> Read("logits"),
    }


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, graph in graphs().items():
        save(graph, out / f"{name}.json")
        print(f"{out / name}.json  digest {graph.digest()[:16]}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
