"""Logit lens: the most likely next token after each layer of the bundled SmolLM2.

    python examples/logit_lens.py
"""

from pathlib import Path

from nnterp import StandardizedTransformer
from nnterp.dsl import load, run

PROMPT = "The capital of France is"


def main() -> None:
    model = StandardizedTransformer("bundled")
    graph = load(Path(__file__).with_name("lens.json"))  # Lens(layers="all", top_k=5)
    probs, ids = run(graph, model, PROMPT)["lens"]  # each [1 prompt, 30 layers, 5]
    print(f"logit lens of {PROMPT!r} (top token per layer):")
    for layer in range(model.num_layers):
        token = model.tokenizer.decode(ids[0, layer, 0])
        print(f"{layer:3d}  {token!r:14} p={probs[0, layer, 0].item():.3f}")


if __name__ == "__main__":
    main()
