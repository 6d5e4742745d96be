"""Records, tokenization and rows of the fine-tuning job's data (chronicals/data.py)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from chronicals import data as data_lib
from chronicals.train import IGNORE_INDEX, count_label_tokens


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(data_lib.default_tokenizer_path())


def _chat(*turns: tuple[str, object]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


_GOOD = _chat(("user", "What is 1 + 1?"), ("assistant", "2"))
_RECORDS = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3)]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (_chat(("system", "Be brief."), ("user", "Hi")),
         r"records\[2\]: no 'assistant' message.*Got roles \['system', 'user'\]"),
        (_chat(("human", "Hi"), ("assistant", "Hello")),
         r"records\[2\]: messages\[0\] has role 'human'; expected one of \('system', 'user', "),
        (_chat(("user", [{"type": "text", "text": "Hi"}]), ("assistant", "Hello")),
         r"records\[2\]: messages\[0\] \(user\) must have a string 'content'. Got list"),
        (_chat(("user", "Hi"), ("assistant", None)),
         (r"records\[2\]: messages\[1\] \(assistant\) must have a string 'content'. Got "
          "NoneType")),
        ({"messages": []},
         r"records\[2\]: 'messages' must be a non-empty list .* Got an empty list"),
        ({"messages": [{"role": "user"}]},
         (r"records\[2\]: messages\[0\] must be an object with 'role' and 'content'. Got keys "
          r"\['role'\]")),
    ],
    ids=["no-assistant", "unknown-role", "list-content", "none-content", "empty", "no-content"],
)
def test_bad_chat_record_is_an_error_naming_it(tokenizer, record, message):
    # Before: the first two were trained on nothing without a word, the next two raised a
    # TypeError from inside the chat template. Records given in memory are named by their index.
    with pytest.raises(ValueError, match=message):
        data_lib.tokenize_records([_GOOD, _GOOD, record, _GOOD], tokenizer)


def _json_lines(records: list, blank_after: int = -1) -> str:
    return "".join(json.dumps(r) + ("\n\n" if i == blank_after else "\n")
                   for i, r in enumerate(records))


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        # Before: "record 6" for the record on line 8 (records counted from 0, blank lines not
        # counted), without the file's name.
        ("data.jsonl", _json_lines([_GOOD] * 6 + [_chat(("user", "Hi"))], blank_after=2),
         r"data: \S*data.jsonl:8: no 'assistant' message.* Got roles \['user'\]"),
        ("data.jsonl", _json_lines([_RECORDS[0], {"prompt": "p", "completion": 7}]),
         r"data: \S*data.jsonl:2: 'prompt' and 'completion' must be strings. Got str and int"),
        ("data.jsonl", _json_lines([_RECORDS[0], {"prompt": "p", "answer": "a"}]),
         r"data: \S*data.jsonl:2: expected a 'completion' field. Got fields \['answer', 'prompt'\]"),
        ("data.jsonl", _json_lines([{"text": "t"}]),
         r"data: \S*data.jsonl:1: expected a 'messages' column .* Got columns \['text'\]"),
        # A pretty-printed array: the line the record's object starts on.
        ("data.json", json.dumps([_GOOD, _GOOD, _chat(("user", "Hi"))], indent=2),
         (rf"data: \S*data.json:{2 + 2 * len(json.dumps(_GOOD, indent=2).splitlines())}: "
          "no 'assistant' message")),
    ],
    ids=["jsonl-blank-line", "jsonl-type", "jsonl-missing-field", "jsonl-columns", "json-array"],
)
def test_record_error_names_file_and_line(tokenizer, tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        data_lib.tokenize_records(data_lib.load_records(path), tokenizer)


def test_json_array_locations_are_the_lines_records_start_on(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n\n  {"prompt": "c",\n'
                    '   "completion": "d"}, {"prompt": "e", "completion": "f"}\n]\n')
    records = data_lib.load_records(path)
    assert records == [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"},
                       {"prompt": "e", "completion": "f"}]
    assert records.locations == [f"{path}:2", f"{path}:4", f"{path}:5"]


@pytest.mark.parametrize(
    ("text", "encoding"),
    [(json.dumps(_RECORDS, indent=2), "utf-8"),  # pretty-printed array
     (json.dumps(_RECORDS, indent=2), "utf-8-sig"),  # the same with a byte-order mark
     ("".join(json.dumps(r) + "\n" for r in _RECORDS), "utf-8")],  # JSON lines in a .json
    ids=["array", "array-bom", "json-lines"],
)
def test_json_file_holds_an_array_or_json_lines(tmp_path, text, encoding):
    path = tmp_path / "data.json"
    path.write_text(text, encoding=encoding)
    assert data_lib.load_records(path) == _RECORDS


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [("data.json", json.dumps({"data": _RECORDS}, indent=2),
      r"one JSON object spread over several lines \(keys \['data'\]\); expected a JSON array"),
     # Before: "line 1", where reading it as JSON lines failed; the array ends on line 3.
     ("data.json", '[{"prompt": "p"},\n\n',
      (r"data.json:3: not valid JSON \(Expecting value, column 1\); expected a JSON array of "
       "record objects")),
     ("data.json", '{"prompt": "p", "completion": "c"}\n{"prompt": "p"\n',
      (r"data.json:2: not valid JSON \(.*\); expected a JSON array of record objects or JSON "
       "lines")),
     ("data.jsonl", json.dumps(_RECORDS, indent=2),
      r"data.jsonl:1: not valid JSON .*; expected JSON lines \(one record object per line\)"),
     ("data.jsonl", '{"prompt": "p", "completion": "c"}\n["p", "c"]\n',
      r"data.jsonl:2: expected a JSON object \(one per record\). Got a JSON array")],
    ids=["json-object", "json-cut-short", "json-lines-cut-short", "jsonl-array",
         "jsonl-not-object"],
)
def test_json_file_in_another_shape_says_what_is_expected(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        data_lib.load_records(path)


def test_unknown_dataset_name_offline_is_an_error(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    # Offline, as this test must never reach the Hub: every request is refused before it is sent.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    with pytest.raises(ValueError, match=r"'chronicals-test/no-such-data' is neither a local file "
                       r"nor a dataset `datasets` can load .*OfflineModeIsEnabled"):
        data_lib.load_records("chronicals-test/no-such-data")


def _example(n: int, labelled_from: int) -> data_lib.Example:
    ids = list(range(10, 10 + n))
    return data_lib.Example(
        input_ids=ids, labels=[IGNORE_INDEX] * labelled_from + ids[labelled_from:]
    )


def _scored_labels(rows: data_lib.Rows) -> list[int]:
    """The labels a causal-LM loss scores, in any order (position t predicts label t + 1)."""
    return sorted(rows.labels[:, 1:][rows.labels[:, 1:] != IGNORE_INDEX].tolist())


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("n", [8, 9, 10, 16, 17, 40])
def test_split_scores_every_label_once(packing, n):
    # Before: each piece after the first lost its first label (a piece's first label is never
    # scored), 1 of every 8 here; the pieces now overlap by one token.
    max_len = 8
    examples = [_example(n, labelled_from=3), _example(5, labelled_from=1)]
    rows = data_lib.make_rows(examples, max_len=max_len, pad_id=0, packing=packing,
                              overlong="split")
    expected = sorted(label for ex in examples for label in ex.labels[1:] if label != IGNORE_INDEX)
    assert _scored_labels(rows) == expected
    assert rows.overlong == data_lib.OverlongCounts(split=int(n > max_len))


def test_truncate_counts_examples_that_lose_every_label():
    examples = [_example(20, labelled_from=15), _example(20, labelled_from=4), _example(6, 2)]
    rows = data_lib.make_rows(examples, max_len=8, pad_id=0, packing=True, overlong="truncate")
    assert rows.overlong == data_lib.OverlongCounts(truncated=2, truncated_to_no_labels=1)
    assert count_label_tokens(rows.labels) == (8 - 4) + (6 - 2)


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_overlong_error_names_the_longest_example(packing):
    examples = [_example(5, 1), _example(30, 1), _example(12, 1), _example(40, 1)]
    with pytest.raises(ValueError, match=r"3 of 4 examples are longer than max_len=10 tokens "
                       r"\(the longest, examples\[3\], has 40\)"):
        data_lib.make_rows(examples, max_len=10, pad_id=0, packing=packing)

