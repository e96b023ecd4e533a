"""Activation patching: the last token's layer-10 residual stream, taken from an Italy
prompt and patched into a France prompt, seen through the logit lens at three layers
(activation_patching.json).

    python examples/patching.py
"""

from pathlib import Path

from nnterp import StandardizedTransformer
from nnterp.dsl import Lens, load, run

PROMPT = "The capital of France is"
LAYERS = [20, 24, 29]  # the layers of the graph's Lens


def main() -> None:
    model = StandardizedTransformer("bundled")
    patched = load(Path(__file__).with_name("activation_patching.json"))  # Patch >> Lens
    clean = run(Lens(layers=LAYERS), model, PROMPT)["lens"][0]  # [3 layers, vocab]
    lens = run(patched, model, PROMPT)["lens"][0]
    paris, rome = (model.tokenizer(t, add_special_tokens=False)["input_ids"][0]
                   for t in (" Paris", " Rome"))
    print(f"{PROMPT!r}, layers[10].output patched from 'The capital of Italy is':")
    for i, layer in enumerate(LAYERS):
        for label, probs in (("clean", clean[i]), ("patched", lens[i])):
            top = model.tokenizer.decode(probs.argmax())
            print(f"layer {layer} {label:8} top {top!r:10} p(' Paris')={probs[paris]:.2e}"
                  f" p(' Rome')={probs[rome]:.2e}")


if __name__ == "__main__":
    main()
