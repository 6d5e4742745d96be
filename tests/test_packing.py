"""Tests for chronicals/packing.py: BFD placement, row layout, statistics, policies, bad input."""

from __future__ import annotations

import itertools
import math
import random
import re
from collections import UserDict

import numpy as np
import pytest
import torch

from chronicals import data as data_lib
from chronicals.packing import (
    PAD_SEGMENT,
    Document,
    PackedBatch,
    PackingCollator,
    best_fit_decreasing,
    pack,
)

IGNORE = -100


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Plain O(n * bins) FFD, the comparison for BFD."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for b, room in enumerate(free):
            if room >= lengths[i]:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins


def random_lengths(rng: random.Random, kind: str, n: int, cap: int) -> list[int]:
    if kind == "uniform":
        raw = [rng.randint(1, cap) for _ in range(n)]
    elif kind == "lognormal":
        raw = [int(rng.lognormvariate(math.log(cap / 6), 1.0)) for _ in range(n)]
    elif kind == "third-to-half":  # hard for greedy packers: pairs that barely fit
        raw = [rng.randint(cap // 3, cap // 2 + 1) for _ in range(n)]
    else:  # "bimodal"
        raw = [rng.choice([1, 2, 3, cap // 3 + 1, cap // 2, cap - 1, cap]) for _ in range(n)]
    return [min(max(1, x), cap) for x in raw]


def make_examples(rng: random.Random, lengths: list[int], vocab: int = 1000) -> list[dict]:
    """Examples with distinct token ids, a masked prompt of random length, labels = ids after it."""
    out = []
    for n in lengths:
        ids = [rng.randrange(vocab) for _ in range(n)]
        prompt = rng.randint(0, n - 1)
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def check_layout(packed: PackedBatch, examples: list[dict], max_len: int, pad_id: int = 0) -> None:
    """Every property of the row layout the module docstring states."""
    rows, width = packed.input_ids.shape
    assert width == max_len and rows == len(packed.documents)
    for t in (packed.input_ids, packed.labels, packed.position_ids):
        assert t.dtype == torch.long and t.shape == (rows, max_len)
    assert packed.cu_seqlens.dtype == torch.int32
    bounds = packed.cu_seqlens.tolist()
    assert bounds[0] == 0 and bounds[-1] == rows * max_len
    assert all(b > a for a, b in itertools.pairwise(bounds))
    seg_lens = [b - a for a, b in itertools.pairwise(bounds)]
    assert packed.max_seqlen == max(seg_lens)
    expected_bounds = []
    placed: dict[int, list[Document]] = {}
    for r, row in enumerate(packed.documents):
        assert sum(d.length for d in row) <= max_len  # no row exceeds max_len
        slot = 0
        for doc in row:
            placed.setdefault(doc.example, []).append(doc)
            ex = examples[doc.example]
            sl = slice(slot, slot + doc.length)
            src = slice(doc.start, doc.start + doc.length)
            assert packed.input_ids[r, sl].tolist() == ex["input_ids"][src]
            assert packed.position_ids[r, sl].tolist() == list(range(doc.length))
            labels = packed.labels[r, sl].tolist()
            assert labels[0] == IGNORE  # never predicted from the previous document
            assert labels[1:] == ex["labels"][src][1:]  # prompt masking kept
            slot += doc.length
            expected_bounds.append(r * max_len + slot)
        pad = max_len - slot
        assert packed.input_ids[r, slot:].tolist() == [pad_id] * pad
        assert packed.labels[r, slot:].tolist() == [IGNORE] * pad
        assert packed.position_ids[r, slot:].tolist() == [i % PAD_SEGMENT for i in range(pad)]
        while slot < max_len:
            slot = min(slot + PAD_SEGMENT, max_len)
            expected_bounds.append(r * max_len + slot)
    assert bounds[1:] == expected_bounds
    # Position 0 marks exactly the segment starts: the boundaries follow from position_ids.
    starts = (packed.position_ids.flatten() == 0).nonzero().flatten().tolist()
    assert starts + [rows * max_len] == bounds
    # Every example's tokens appear in order (the truncation policy keeps a prefix); split pieces
    # overlap by exactly one token, every other token is placed once.
    for i, ex in enumerate(examples):
        pieces = sorted(placed.pop(i), key=lambda d: d.start)
        for before, after in itertools.pairwise(pieces):
            assert after.start == before.start + before.length - 1
        tokens = [t for d in pieces for t in ex["input_ids"][d.start : d.start + d.length]]
        if packed.overlong == "truncate":
            assert tokens == ex["input_ids"][:max_len]
        else:
            assert [t for j, t in enumerate(tokens) if j not in _seams(pieces)] == ex["input_ids"]
    assert not placed


def _seams(pieces: list[Document]) -> set[int]:
    """Indices, in the pieces' concatenated tokens, of each later piece's first token (the
    overlapping one)."""
    ends = list(itertools.accumulate(d.length for d in pieces))
    return set(ends[:-1])


@pytest.mark.parametrize("kind", ["uniform", "lognormal", "third-to-half", "bimodal"])
@pytest.mark.parametrize("max_len", [2, 7, 64, 300])
def test_layout_properties_on_random_examples(kind, max_len):
    rng = random.Random(f"{kind}-{max_len}")
    for _ in range(5):
        lengths = random_lengths(rng, kind, rng.randint(1, 60), max_len)
        examples = make_examples(rng, lengths)
        packed = pack(examples, max_len=max_len)
        check_layout(packed, examples, max_len)
        stats = packed.stats
        assert stats.real_tokens == sum(lengths)
        assert stats.slots == stats.rows * max_len == packed.input_ids.numel()
        assert stats.min_rows == math.ceil(sum(lengths) / max_len) <= stats.rows
        assert stats.examples == stats.documents == len(examples)
        assert stats.efficiency == pytest.approx(sum(lengths) / (stats.rows * max_len))


def test_bfd_never_uses_more_rows_than_ffd():
    rng = random.Random(0)
    for trial in range(400):
        kind = ["uniform", "lognormal", "third-to-half", "bimodal"][trial % 4]
        cap = rng.choice([5, 16, 37, 100, 512, 2048])
        lengths = random_lengths(rng, kind, rng.randint(1, 300), cap)
        bfd = best_fit_decreasing(lengths, cap)
        assert len(bfd) <= len(first_fit_decreasing(lengths, cap)), (kind, cap, lengths)
        assert sorted(i for b in bfd for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= cap for b in bfd)


def naive_best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """BFD by its definition, O(n * bins): the open bin with the least room that fits, lowest
    index among equals."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        fits = [(room, b) for b, room in enumerate(free) if room >= lengths[i]]
        if fits:
            _, b = min(fits)
        else:
            b = len(bins)
            bins.append([])
            free.append(capacity)
        bins[b].append(i)
        free[b] -= lengths[i]
    return bins


def test_bfd_matches_its_definition():
    rng = random.Random(2)
    for trial in range(300):
        kind = ["uniform", "lognormal", "third-to-half", "bimodal"][trial % 4]
        cap = rng.choice([3, 10, 64, 2048])
        lengths = random_lengths(rng, kind, rng.randint(1, 200), cap)
        assert best_fit_decreasing(lengths, cap) == naive_best_fit_decreasing(lengths, cap)


def test_bfd_takes_the_tightest_bin_where_first_fit_does_not():
    # 7 -> bin 0 (3 free); 4, 4 -> bin 1 (2 free). The 1 goes to the tightest bin, 1; FFD: bin 0.
    assert best_fit_decreasing([7, 4, 4, 1], 10) == [[0], [1, 2, 3]]
    assert first_fit_decreasing([7, 4, 4, 1], 10) == [[0, 3], [1, 2]]
    # Ties keep example order (stable sort, lowest bin index).
    assert best_fit_decreasing([4, 4, 4, 4], 8) == [[0, 1], [2, 3]]
    assert best_fit_decreasing([2, 5, 2, 5], 7) == [[1, 0], [3, 2]]


def test_bfd_on_a_dataset_sized_input_is_near_the_lower_bound():
    # O(n log n): 100k lengths into 2048 slots take about 0.7 s on a loaded 2-core CPU.
    rng = random.Random(1)
    lengths = [min(2048, max(1, int(rng.lognormvariate(math.log(300), 1.0))))
               for _ in range(100_000)]
    bins = best_fit_decreasing(lengths, 2048)
    assert len(bins) <= math.ceil(sum(lengths) / 2048) * 1.01 + 1


def test_first_label_of_every_document_is_masked_so_nothing_is_predicted_across():
    """With HF's internal shift (logits[t] scored against labels[t + 1]), list every
    (position, target) pair the loss uses; none may pair a position with a token of another
    document, and each document keeps exactly the pairs it has when run alone."""
    examples = [{"input_ids": [10, 11, 12]}, {"input_ids": [20, 21]}, {"input_ids": [30]}]
    packed = pack(examples, max_len=8)
    (row,) = packed.documents
    labels = packed.labels[0].tolist()
    owner = [d.example for d in row for _ in range(d.length)] + [-1] * (8 - 6)
    pairs = [(t, labels[t + 1]) for t in range(7) if labels[t + 1] != IGNORE]
    assert all(owner[t] == owner[t + 1] for t, _ in pairs)
    alone = sum(len(e["input_ids"]) - 1 for e in examples)
    assert len(pairs) == alone == 3
    assert packed.input_ids[0].tolist() == [10, 11, 12, 20, 21, 30, 0, 0]
    assert labels == [IGNORE, 11, 12, IGNORE, 21, IGNORE, IGNORE, IGNORE]
    assert packed.position_ids[0].tolist() == [0, 1, 2, 0, 1, 0, 0, 1]
    assert packed.cu_seqlens.tolist() == [0, 3, 5, 6, 8]


def test_pad_tail_is_cut_into_short_segments():
    packed = pack([[1] * 3], max_len=2 * PAD_SEGMENT + 10)
    bounds = packed.cu_seqlens.tolist()
    assert bounds == [0, 3, 3 + PAD_SEGMENT, 3 + 2 * PAD_SEGMENT, 2 * PAD_SEGMENT + 10]
    assert packed.max_seqlen == PAD_SEGMENT
    full = pack([[1] * 5], max_len=5)
    assert full.cu_seqlens.tolist() == [0, 5] and full.max_seqlen == 5


def test_tensor_numpy_and_bare_sequence_examples():
    examples = [
        torch.tensor([5, 6, 7], dtype=torch.int32),
        np.array([8, 9], dtype=np.int64),
        {"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([IGNORE, 2]),
         "attention_mask": [1, 1], "extra": "ignored"},
        (3, 4, 5, 6),
    ]
    packed = pack(examples, max_len=6)
    as_lists = [[5, 6, 7], [8, 9], [1, 2], [3, 4, 5, 6]]
    check_layout(packed, [{"input_ids": x, "labels": x} if i != 2 else
                          {"input_ids": x, "labels": [IGNORE, 2]} for i, x in enumerate(as_lists)],
                 6)


def test_pad_id_and_ignore_index_are_used():
    packed = pack([[1, 2, 3]], max_len=5, pad_id=7, ignore_index=-1)
    assert packed.input_ids.tolist() == [[1, 2, 3, 7, 7]]
    assert packed.labels.tolist() == [[-1, 2, 3, -1, -1]]


def test_overlong_error_is_the_default():
    with pytest.raises(ValueError, match=r"example 1 has 9 tokens, more than max_len=8.*"
                                         r"overlong='truncate'.*overlong='split'"):
        pack([[1] * 3, [2] * 9], max_len=8)


def test_overlong_truncate_keeps_the_prefix_and_counts_it():
    rng = random.Random(3)
    examples = make_examples(rng, [20, 3, 8, 9, 1])
    packed = pack(examples, max_len=8, overlong="truncate")
    check_layout(packed, examples, 8)
    s = packed.stats
    assert (s.truncated_examples, s.truncated_tokens, s.split_examples) == (2, 12 + 1, 0)
    assert s.real_tokens == 8 + 3 + 8 + 8 + 1 and s.documents == s.examples == 5


def test_overlong_split_keeps_every_token_and_counts_it():
    rng = random.Random(4)
    examples = make_examples(rng, [20, 3, 8, 17])
    packed = pack(examples, max_len=8, overlong="split")
    check_layout(packed, examples, 8)
    s = packed.stats
    assert (s.truncated_examples, s.truncated_tokens, s.split_examples) == (0, 0, 2)
    # 20 tokens: pieces at 0, 7, 14 (22 slots); 17 tokens: 0, 7, 14 (19 slots).
    assert s.real_tokens == 22 + 3 + 8 + 19 and s.examples == 4 and s.documents == 3 + 1 + 1 + 3
    pieces = sorted((d.start, d.length) for row in packed.documents for d in row if d.example == 0)
    assert pieces == [(0, 8), (7, 8), (14, 6)]


@pytest.mark.parametrize("n", [9, 14, 15, 16, 22, 50])
@pytest.mark.parametrize("max_len", [2, 3, 8])
def test_overlong_split_scores_every_label_once(n, max_len):
    """Labels unique across examples: the labels the packed rows score (position t predicts label
    t + 1; a document's first label is masked) are exactly each example's labels after its first,
    none lost at a piece boundary and none scored twice."""
    examples = [
        {"input_ids": list(range(n)), "labels": [IGNORE] * 2 + list(range(1002, 1000 + n))},
        {"input_ids": [5] * 3, "labels": [IGNORE, 2001, 2002]},
    ]
    packed = pack(examples, max_len=max_len, overlong="split")
    check_layout(packed, examples, max_len)
    scored = sorted(packed.labels[packed.labels != IGNORE].tolist())
    expected = sorted(label for ex in examples for label in ex["labels"][1:] if label != IGNORE)
    assert scored == expected
    assert packed.stats.split_examples == 1 + (max_len < 3)


def test_batches_split_rows_with_their_own_boundaries_and_drop_nothing():
    rng = random.Random(5)
    lengths = random_lengths(rng, "lognormal", 80, 64)
    examples = make_examples(rng, lengths)
    packed = pack(examples, max_len=64)
    for seed in (None, 0):
        parts = packed.batches(3, seed=seed)
        assert [p.stats.rows for p in parts[:-1]] == [3] * (len(parts) - 1)
        assert sum(p.stats.rows for p in parts) == packed.stats.rows
        assert sum(p.stats.real_tokens for p in parts) == packed.stats.real_tokens
        docs = sorted(d for p in parts for row in p.documents for d in row)
        assert docs == sorted(d for row in packed.documents for d in row)
        for p in parts:
            rows_here = [packed.documents.index(row) for row in p.documents]
            for name in ("input_ids", "labels", "position_ids"):
                assert torch.equal(getattr(p, name), getattr(packed, name)[rows_here])
            lengths_here = [d.length for row in p.documents for d in row]
            assert p.cu_seqlens[-1].item() == p.stats.rows * 64
            assert set(lengths_here) <= set(torch.diff(p.cu_seqlens).tolist())
    assert packed.batches(3, seed=1)[0].documents == packed.batches(3, seed=1)[0].documents
    with pytest.raises(ValueError, match=r"rows must be >= 1. Got 0"):
        packed.batches(0)


def test_batches_take_any_integral_rows_and_seed():
    packed = pack([[1, 2], [3, 4, 5], [6]], max_len=3)
    for got, want in ((packed.batches(np.int64(2), seed=np.int32(1)), packed.batches(2, seed=1)),
                      (packed.batches(np.uint8(1)), packed.batches(1))):
        assert [b.documents for b in got] == [b.documents for b in want]
        assert all(torch.equal(g.input_ids, w.input_ids) for g, w in zip(got, want))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"rows": True}, TypeError, "rows must be an int. Got bool"),
        ({"rows": 2.0}, TypeError, "rows must be an int. Got float"),
        ({"rows": np.int64(-1)}, ValueError, r"rows must be >= 1. Got -1"),
        ({"rows": 2, "seed": "a"}, TypeError, "seed must be an int. Got str"),
        ({"rows": 2, "seed": 1.5}, TypeError, "seed must be an int. Got float"),
        ({"rows": 2, "seed": 2**64}, ValueError, rf"seed must be <= {2**64 - 1}"),
    ],
)
def test_batches_refuse_bad_rows_and_seed(kwargs, error, match):
    packed = pack([[1, 2], [3]], max_len=4)
    with pytest.raises(error, match=match):
        packed.batches(**kwargs)


def test_model_inputs_share_one_boundary_tensor():
    packed = pack([[1, 2, 3], [4, 5]], max_len=4)
    inputs = packed.model_inputs()
    assert set(inputs) == {"input_ids", "labels", "position_ids", "cu_seq_lens_q",
                           "cu_seq_lens_k", "max_length_q", "max_length_k"}
    assert inputs["cu_seq_lens_q"] is inputs["cu_seq_lens_k"]
    # max_length is the row length, not the longest document (packed.max_seqlen): the same for
    # every batch, so a compiled model is not specialised on it; the finetune job's batches
    # (data.select) get the same.
    assert packed.max_seqlen == 3
    assert inputs["max_length_q"] == inputs["max_length_k"] == packed.max_len == 4
    rows = data_lib.make_rows([data_lib.Example(input_ids=[1, 2, 3], labels=[1, 2, 3]),
                               data_lib.Example(input_ids=[4, 5], labels=[4, 5])],
                              max_len=4, pad_id=0, packing=True, overlong="error")
    selected = data_lib.select(rows, range(len(rows)))
    for name in ("cu_seq_lens_q", "max_length_q", "max_length_k"):
        assert torch.equal(torch.as_tensor(selected[name]), torch.as_tensor(inputs[name])), name


def test_collator_returns_model_inputs_and_stats():
    rng = random.Random(6)
    examples = make_examples(rng, [5, 9, 3, 12, 7, 1, 4])
    collate = PackingCollator(max_len=16)
    batch = collate(examples)
    stats = batch.pop("packing_stats")
    assert stats.real_tokens == 41 and stats.rows == 3 and stats.min_rows == 3
    assert stats.efficiency == pytest.approx(41 / 48)
    expected = pack(examples, max_len=16).model_inputs()
    assert batch.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(batch[k], v) if torch.is_tensor(v) else batch[k] == v
    # Works as a DataLoader collate_fn over dataset rows.
    loader = torch.utils.data.DataLoader(examples, batch_size=4, collate_fn=collate)
    got = [b["packing_stats"].real_tokens for b in loader]
    assert got == [5 + 9 + 3 + 12, 7 + 1 + 4]


def test_collator_checks_its_settings_up_front():
    with pytest.raises(ValueError, match="max_len must be >= 2"):
        PackingCollator(max_len=1)
    with pytest.raises(ValueError, match="overlong must be one of"):
        PackingCollator(max_len=8, overlong="drop")
    with pytest.raises(ValueError, match=r"pad_id must be >= 0 \(a token id.*Got -1"):
        PackingCollator(max_len=8, pad_id=-1)


def test_collator_validates_examples_like_pack():
    collate = PackingCollator(max_len=8)
    with pytest.raises(TypeError, match="examples must be a sequence of example dicts"):
        collate({"input_ids": [[1, 2], [3]]})
    with pytest.raises(TypeError, match=r"input_ids must be a 1-D sequence of ints.*bfloat16"):
        collate([{"input_ids": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}])
    with pytest.raises(ValueError, match=r"example 0: input_ids\[1\] is -3"):
        collate([{"input_ids": [1, -3]}])
    with pytest.raises(ValueError, match="example 0 has 2 input_ids but 1 attention_mask"):
        collate([{"input_ids": [1, 2], "attention_mask": [1]}])


def test_integral_settings_are_taken_as_ints():
    packed = pack([[1, 2, 3]], max_len=np.int64(5), pad_id=np.int32(7), ignore_index=np.int16(-1))
    assert packed.input_ids.tolist() == [[1, 2, 3, 7, 7]]
    assert packed.labels.tolist() == [[-1, 2, 3, -1, -1]]
    assert type(packed.documents[0][0].length) is int
    collate = PackingCollator(max_len=np.int64(5))
    assert type(collate.max_len) is int


@pytest.mark.parametrize("batch", [{"input_ids": [[1, 2], [3]]}, UserDict(input_ids=[[1, 2]])])
def test_batched_columnar_dict_is_refused(batch):
    """HF's batched format (a dict of columns) iterates over its keys, so each "example" would be
    a column name; it is refused as a whole instead."""
    with pytest.raises(TypeError, match=r"examples must be a sequence of example dicts, one per "
                                        r"example\. Got a \w+ with keys \['input_ids'\], i\.e\. a "
                                        r"batched \(columnar\) dict"):
        pack(batch, max_len=4)


NON_INTEGER_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64,
                      torch.complex64, torch.bool, torch.float8_e4m3fn]


@pytest.mark.parametrize("dtype", NON_INTEGER_DTYPES, ids=str)
@pytest.mark.parametrize("where", ["bare", "input_ids", "labels"])
def test_non_integer_tensors_are_refused_by_dtype(dtype, where):
    bad = torch.ones(2).to(dtype)
    example = {"bare": bad, "input_ids": {"input_ids": bad},
               "labels": {"input_ids": [1, 2], "labels": bad}}[where]
    name = "labels" if where == "labels" else "input_ids"
    message = f"example 0: {name} must be a 1-D sequence of ints. Got shape (2,) of {dtype}."
    with pytest.raises(TypeError, match=re.escape(message) + "$"):
        pack([example], max_len=4)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.bool_, object])
def test_non_integer_arrays_are_refused_by_dtype(dtype):
    with pytest.raises(TypeError, match=rf"input_ids must be a 1-D sequence of ints. Got shape "
                                        rf"\(2,\) of {np.dtype(dtype)}"):
        pack([np.array([1, 2], dtype=dtype)], max_len=4)


def test_unsigned_and_narrow_integer_ids_are_packed_exactly():
    top = 2**63 - 1  # the largest id int64 holds
    examples = [np.array([top, 0], dtype=np.uint64), torch.tensor([5, 6], dtype=torch.uint64),
                np.array([127, 1], dtype=np.int8), torch.tensor([255], dtype=torch.uint8)]
    packed = pack(examples, max_len=2)
    placed = {d.example: packed.input_ids[r, :d.length].tolist()
              for r, row in enumerate(packed.documents) for d in row}
    assert placed == {0: [top, 0], 1: [5, 6], 2: [127, 1], 3: [255]}


@pytest.mark.parametrize(
    "example, match",
    [
        ([3, -5], rf"input_ids\[1\] is -5; expected token ids in \[0, {2**63 - 1}\] \(int64\)\.$"),
        (np.array([1, -128], dtype=np.int8), r"input_ids\[1\] is -128"),
        (np.array([1, 2**63 + 5], dtype=np.uint64), r"input_ids\[1\] is 9223372036854775813"),
        (torch.tensor([2**63 + 5], dtype=torch.uint64), r"input_ids\[0\] is 9223372036854775813"),
        ([2**63], r"input_ids\[0\] is 9223372036854775808"),  # numpy reads it as uint64
        ({"input_ids": [1, 2], "labels": [-100, -1]},
         r"labels\[1\] is -1; expected token ids in .* or ignore_index=-100\.$"),
        ({"input_ids": [1, 2], "labels": np.array([2, 2**64 - 100], dtype=np.uint64)},
         r"labels\[1\] is 18446744073709551516"),  # would wrap to -100 in a plain int64 cast
    ],
)
def test_token_ids_outside_int64_or_negative_are_refused(example, match):
    with pytest.raises(ValueError, match=r"pack: example 0: " + match):
        pack([example], max_len=4)


def test_labels_may_hold_the_ignore_index_they_are_packed_with():
    packed = pack([{"input_ids": [1, 2, 3], "labels": [-1, -1, 3]}], max_len=4, ignore_index=-1)
    assert packed.labels.tolist() == [[-1, -1, 3, -1]]


@pytest.mark.parametrize("mask", [[1], [], [1, 1, 1, 1], torch.ones(4, dtype=torch.long)])
def test_attention_mask_of_another_length_is_refused(mask):
    n = len(mask)
    with pytest.raises(ValueError, match=rf"pack: example 1 has 3 input_ids but {n} "
                                         rf"attention_mask; they must have the same length"):
        pack([[1], {"input_ids": [1, 2, 3], "attention_mask": mask}], max_len=4)


@pytest.mark.parametrize("mask", [[1, 1, 1], torch.ones(3, dtype=torch.bool), np.ones(3, np.int8)])
def test_attention_mask_of_ones_is_accepted(mask):
    packed = pack([{"input_ids": [4, 5, 6], "attention_mask": mask}], max_len=4)
    assert packed.input_ids.tolist() == [[4, 5, 6, 0]]
    assert packed.labels.tolist() == [[IGNORE, 5, 6, IGNORE]]


@pytest.mark.parametrize(
    "examples, kwargs, error, match",
    [
        ([], {}, ValueError, "got no examples"),
        ([[1, 2], []], {}, ValueError, "example 1 has no tokens"),
        ([{"input_ids": []}], {}, ValueError, "example 0 has no tokens"),
        ([[1, 2]], {"max_len": 1}, ValueError, r"max_len must be >= 2.*Got 1"),
        ([[1, 2]], {"max_len": 0}, ValueError, "max_len must be >= 2"),
        ([[1, 2]], {"max_len": 8.0}, TypeError, "max_len must be an int. Got float"),
        ([[1, 2]], {"overlong": "drop"}, ValueError, "overlong must be one of"),
        ([{"input_ids": [1, 2, 3], "labels": [1, 2]}], {}, ValueError,
         "example 0 has 3 input_ids but 2 labels"),
        ([{"labels": [1, 2]}], {}, ValueError, "example 0 has no 'input_ids'"),
        ([[1.5, 2.0]], {}, TypeError, "example 0: input_ids must be a 1-D sequence of ints"),
        ([[[1, 2]]], {}, TypeError, r"must be a 1-D sequence of ints. Got shape \(1, 2\)"),
        ([{"input_ids": [[1, 2], [3]]}], {}, TypeError,
         "example 0: input_ids must be a 1-D sequence of ints. Got a ragged nested sequence"),
        (["hello"], {}, TypeError, "input_ids must be a sequence of ints.*Got str"),
        ([{"input_ids": [1, 2], "attention_mask": [1, 0]}], {}, ValueError,
         "attention_mask with zeros"),
        ([[1, 2]], {"pad_id": None}, TypeError, "pad_id must be an int"),
        ([[1, 2]], {"pad_id": -1}, ValueError, r"pad_id must be >= 0 \(a token id.*Got -1\."),
        ([[1, 2]], {"pad_id": 2**63}, ValueError, rf"pad_id must be <= {2**63 - 1}.*Got {2**63}"),
        ([[1, 2]], {"ignore_index": -(2**63) - 1}, ValueError, "ignore_index must be >= "),
        ([[1, 2]], {"max_len": True}, TypeError, "max_len must be an int. Got bool"),
        ([{"input_ids": [1, 2], "attention_mask": [1, None]}], {}, TypeError,
         r"attention_mask must be a 1-D sequence of ints. Got shape \(2,\) of object"),
    ],
)
def test_bad_input_raises_clear_errors(examples, kwargs, error, match):
    kwargs = {"max_len": 8, **kwargs}
    with pytest.raises(error, match=match):
        pack(examples, **kwargs)


def test_best_fit_decreasing_rejects_items_that_do_not_fit():
    with pytest.raises(ValueError, match=r"length 1 is 9; expected 1..8"):
        best_fit_decreasing([3, 9], 8)
    with pytest.raises(ValueError, match=r"length 0 is 0"):
        best_fit_decreasing([0], 8)
