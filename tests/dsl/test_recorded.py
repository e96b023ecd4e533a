"""Recorded values as blocks give exactly what the same values give key by key.

`BlockValues` is what the batch-wide vLLM executor returns: one sorted block of rows per
op. A run's assembly reads whole stacks from it, or single keys; both must equal a
plain dict holding the same values (`KeyedValues`, what the HF backend returns).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnterp.dsl.plan import OutputKey
from nnterp.dsl.recorded import Block, BlockValues, KeyedValues, as_recorded


def _block(name, single, rows, width=3, layer=None, pair=False):
    """rows: (prompt, step, order) triples, already sorted; each row's data encodes them."""
    meta = np.array(rows, dtype=np.int64).reshape(-1, 3)
    data = torch.tensor([[100.0 * p + 10.0 * s + o] * width for p, s, o in meta.tolist()])
    if pair:
        data = (data, data.long())
    return Block(name, layer, single, meta, data)


def _keyed(block):
    values = {}
    for (p, s, o), row in zip(block.meta.tolist(), range(len(block.meta))):
        key = OutputKey(block.name, step=s, prompt=p, layer=block.layer)
        take = lambda t: t[row] if block.single else t[row:row + 1]  # noqa: E731
        value = tuple(take(t) for t in block.tensors) if isinstance(block.data, tuple) else take(block.data)
        if block.single or key not in values:
            values[key] = value
        else:
            old = values[key]
            values[key] = tuple(torch.cat([a, b]) for a, b in zip(old, value)) if isinstance(old, tuple) \
                else torch.cat([old, value])
    return values


def _equal(a, b):
    if isinstance(a, tuple):
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


@pytest.mark.parametrize("pair", [False, True])
def test_keys_of_a_block_equal_the_same_values_in_a_dict(pair):
    single = _block("r", True, [(0, 0, 0), (0, 1, 0), (1, 0, 0), (2, 0, 0), (2, 1, 0)], pair=pair)
    ragged = _block("all", False, [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1), (1, 0, 2)], pair=pair)
    values = BlockValues([single, ragged])
    want = {**_keyed(single), **_keyed(ragged)}
    assert set(values) == set(want) and len(values) == len(want)
    for key, value in want.items():
        assert _equal(values[key], value), key


def test_a_stack_is_every_prompt_at_one_step_in_prompt_order():
    block = _block("r", True, [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)])
    values = BlockValues([block])
    stack = values.stacked("r", None, 1, 2)
    assert stack.tolist() == [[10.0] * 3, [110.0] * 3]
    assert values.stacked("r", None, 0, 3) is None  # a prompt without a row: read key by key
    assert values.stacked("other", None, 0, 2) is None


def test_listed_positions_stack_per_prompt_and_ragged_rows_do_not():
    listed = _block("two", False, [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1)])
    stack = BlockValues([listed]).stacked("two", None, 0, 2)
    assert stack.shape == (2, 2, 3) and stack[1, 1, 0].item() == 101.0
    # positions=None: a row's order is its position, and prompts differ in length
    ragged = _block("all", False, [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1), (1, 0, 2), (1, 0, 3)])
    assert BlockValues([ragged]).stacked("all", None, 0, 2) is None


def test_lens_layers_are_separate_blocks():
    blocks = [_block("lens", True, [(0, 0, 0), (1, 0, 0)], layer=layer, pair=True) for layer in range(3)]
    values = BlockValues(blocks)
    probs, ids = values.stacked("lens", 2, 0, 2)
    assert probs.shape == (2, 3) and ids.dtype == torch.int64
    assert _equal(values[OutputKey("lens", step=0, prompt=1, layer=2)], (probs[1], ids[1]))


def test_steps_a_prompt_never_reached_are_dropped_from_both_stores():
    block = _block("r", True, [(0, 0, 0), (0, 1, 0), (0, 2, 0), (1, 0, 0), (1, 1, 0), (1, 2, 0)])
    generated = [3, 1]  # prompt 1 ended after its first token
    blocks = BlockValues([block]).before_end(generated)
    keyed = KeyedValues(_keyed(block)).before_end(generated)
    assert set(blocks) == set(keyed) == {OutputKey("r", step=s, prompt=p)
                                         for p, s in [(0, 0), (0, 1), (0, 2), (1, 0)]}
    untouched = BlockValues([block])
    assert untouched.before_end([3, 3]) is untouched


def test_a_plain_dict_becomes_keyed_values_and_bad_blocks_are_refused():
    assert isinstance(as_recorded({}), KeyedValues)
    with pytest.raises(ValueError, match=r"\[rows, 3\]"):
        Block("r", None, True, np.zeros((2, 2)), torch.zeros(2, 3))
    block = _block("r", True, [(0, 0, 0)])
    with pytest.raises(ValueError, match="same output"):
        BlockValues([block, block])


def test_a_recorder_joins_batches_into_sorted_blocks():
    from nnterp.dsl.recorded import Recorder

    recorder = Recorder()
    for step in range(3):  # an executor records step by step; blocks are by prompt first
        recorder.add_rows("r", None, step, [0, 1], torch.tensor([[10.0 * step], [10.0 * step + 1]]), single=True)
        recorder.add_rows("two", None, step, [0, 1], torch.arange(4.0).reshape(2, 2, 1) + 100 * step, single=False)
    pair = (torch.tensor([[0.5, 0.25]]), torch.tensor([[7, 3]]))
    recorder.add_rows("lens", 4, 0, [1], pair, single=True)
    recorder[OutputKey("probs", step=0, prompt=0)] = torch.ones(2, 2)
    values = recorder.recorded()
    assert values[OutputKey("r", step=2, prompt=1)].tolist() == [21.0]
    assert values.stacked("r", None, 1, 2).tolist() == [[10.0], [11.0]]
    assert values[OutputKey("two", step=1, prompt=1)].tolist() == [[102.0], [103.0]]
    assert values.stacked("two", None, 0, 2).shape == (2, 2, 1)
    assert _equal(values[OutputKey("lens", step=0, prompt=1, layer=4)], (pair[0][0], pair[1][0]))
    assert values[OutputKey("probs", step=0, prompt=0)].shape == (2, 2)
    assert OutputKey("probs", step=0, prompt=0) not in values.before_end([0, 1])
    with pytest.raises(ValueError, match="both as single values and as lists"):
        recorder.add_rows("r", None, 0, [0], torch.zeros(1, 2, 1), single=False)


def test_a_range_of_prompts_is_numbered_from_zero_in_both_stores():
    rows = [(p, s, o) for p in range(4) for s in range(2) for o in range(2)]
    block = _block("r", False, rows)
    share = BlockValues([block]).prompt_range(1, 3)
    keyed = KeyedValues(_keyed(block)).prompt_range(1, 3)
    assert sorted(share, key=repr) == sorted(keyed, key=repr)
    assert {key.prompt for key in share} == {0, 1}
    for key in keyed:
        assert torch.equal(share[key], keyed[key])
    # prompt 0 of the share is prompt 1 of the whole: its data says so
    assert share[OutputKey("r", step=1, prompt=0)][0, 0].item() == 110.0
    stacked = share.stacked("r", None, 0, 2)
    assert stacked.shape == (2, 2, 3) and stacked[1, 1, 0].item() == 201.0
