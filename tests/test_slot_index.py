"""The per-connection index a gateway's message is looked up in (engine/slot_index.py),
checked against a plain dict over random opens and closes."""

from __future__ import annotations

import numpy as np

from engine.slot_index import SlotIndex, lookup


def test_lookup_matches_a_dict_through_opens_and_closes() -> None:
    rng = np.random.default_rng(7)
    index, truth = SlotIndex(), dict[int, int]()
    stamps = np.zeros(4096, np.int64)
    for step in range(1, 400):
        if truth and rng.random() < 0.4:
            stream_id = int(rng.choice(list(truth)))
            index.remove(stream_id)
            del truth[stream_id]
        else:
            stream_id = int(rng.integers(0, 2**32))
            if stream_id not in truth:
                slot = int(rng.integers(0, 4096))
                while slot in truth.values():
                    slot = int(rng.integers(0, 4096))
                index.add(stream_id, slot)
                truth[stream_id] = slot
        assert len(index) == len(truth) and list(index.ids) == sorted(truth)
        asked = list(truth)[:20] + [int(x) for x in rng.integers(0, 2**32, 5)]
        rng.shuffle(asked)
        ids = np.array(asked, np.uint32)
        out = np.empty(len(ids), np.intp)
        assert lookup(index.ids, index.slots, ids, stamps, step, out)
        assert out.tolist() == [truth.get(i, -1) for i in asked]


def test_an_open_stream_named_twice_is_refused_an_unknown_one_is_not() -> None:
    index = SlotIndex()
    for stream_id, slot in ((5, 50), (9, 90), (2, 20)):
        index.add(stream_id, slot)
    stamps = np.zeros(100, np.int64)
    out = np.empty(4, np.intp)
    assert not lookup(index.ids, index.slots, np.array([5, 2, 9, 2], np.uint32), stamps, 1, out)
    assert lookup(index.ids, index.slots, np.array([7, 2, 7, 9], np.uint32), stamps, 2, out)
    assert out.tolist() == [-1, 20, -1, 90]
    # Marks from an earlier message do not count as repeats in the next one.
    assert lookup(index.ids, index.slots, np.array([2, 9, 5, 3], np.uint32), stamps, 3, out)
    assert out.tolist() == [20, 90, 50, -1]
