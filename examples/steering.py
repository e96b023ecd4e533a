"""Steering during generation: push layer 25 towards " London" (steer_generation.json).

    python examples/steering.py
"""

from pathlib import Path

from nnterp import StandardizedTransformer
from nnterp.dsl import Read, Sampling, load, run

PROMPT = "The capital of France is"


def main() -> None:
    model = StandardizedTransformer("bundled")
    steer = load(Path(__file__).with_name("steer_generation.json"))  # Steer(25, ...) >> Read
    sampling = Sampling(max_tokens=10)  # greedy
    clean = run(Read("logits"), model, PROMPT, sampling=sampling)
    steered = run(steer, model, PROMPT, sampling=sampling)
    print(f"prompt:  {PROMPT!r}")
    print(f"clean:   {clean.texts[0]!r}")
    print(f"steered: {steered.texts[0]!r}")
    print(f"steered logits per step: {tuple(steered['logits'][0].shape)}")


if __name__ == "__main__":
    main()
