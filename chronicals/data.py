"""Data for the fine-tuning job: records in, fixed-shape rows of token ids out.

    load_records(source)            local .json / .jsonl / .parquet file, or a `datasets` name
    -> tokenize_records(...)        chat (loss on assistant turns) or prompt/completion (loss on the
                                    completion): token ids + labels with -100 where no loss is taken
    -> split_eval(...)              a held-out evaluation split, fixed by the seed
    -> make_rows(...)               packed rows (chronicals.packing, per-document position_ids) or
                                    padded rows (attention_mask), all of length max_len
    -> batch_at(rows, cursor, ...)  the micro-batch at a position of an endless, per-epoch shuffled
                                    stream of rows: the position is one integer, so resuming a run
                                    continues exactly where it stopped

The built-in default data (`default_data_path()`) is HumanEval (OpenAI, MIT licence; 164 Python
prompts with their reference solutions as completions) and the default tokenizer
(`default_tokenizer_path()`) is a 2,048-token byte-level BPE trained on it by
`build_default_tokenizer`; both ship in `chronicals/data/`, see its README.md.

`datasets` is imported only to load a `datasets` name or a parquet file (the GPU machine has no
`datasets`); .json and .jsonl files are read with the standard library.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from chronicals.packing import OVERLONG_POLICIES, pack, split_pieces, varlen_kwargs
from chronicals.train import IGNORE_INDEX

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
FORMATS = ("chat", "prompt_completion")
CHAT_ROLES = ("system", "user", "assistant", "tool")
"""Roles a chat record's messages may have; the loss is taken on the 'assistant' messages."""
_FILE_SUFFIXES = (".json", ".jsonl", ".parquet")
_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>")
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def default_data_path() -> Path:
    """The bundled default dataset: HumanEval as prompt/completion JSON lines."""
    return DATA_DIR / "humaneval.jsonl"


def default_tokenizer_path() -> Path:
    """Directory of the bundled default tokenizer (`AutoTokenizer.from_pretrained` loads it)."""
    return DATA_DIR


def build_default_tokenizer(out_dir: str | Path, *, vocab_size: int = 2048) -> None:
    """Train the default byte-level BPE tokenizer on the bundled HumanEval text and save it to
    `out_dir` in Hugging Face format (tokenizer.json, tokenizer_config.json, chat_template.jinja).

    This is how the tokenizer files in `chronicals/data/` were made
    (`build_default_tokenizer("chronicals/data")`); training is deterministic and takes ~0.1 s.
    Special tokens: <|endoftext|> (eos), <|pad|>, and <|im_start|>/<|im_end|> for its ChatML
    template.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for record in _read_json_records(default_data_path()):
        texts += [record["prompt"], record["completion"]]
    bpe = Tokenizer(models.BPE())
    # Qwen2Tokenizer's normalizer and pre-tokenizer, which it imposes on any tokenizer.json it
    # loads (transformers 5.17 and 5.25): trained with them, the tokenizer reads the same whether
    # it loads as its own class or, from a saved Qwen2 model's folder, as Qwen2Tokenizer.
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>",
        model_max_length=4096,
    )
    tokenizer.chat_template = _CHATML_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))
    # AutoTokenizer loads the class a folder's tokenizer_config.json names, except that for some
    # model types (qwen2 and phi3 in transformers 5.25) it loads the model type's class whatever
    # the file says. Naming Qwen2Tokenizer here makes the bundled folder and a saved Qwen2-shaped
    # model's folder (the job's default model) load as the same class with the same pre-tokenizer.
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "Qwen2Tokenizer"
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


# Qwen2Tokenizer's pre-tokenization regex (transformers/models/qwen2/tokenization_qwen2.py, the
# same in 5.17 and 5.25): contractions, letters, single digits, punctuation runs, newline runs,
# and whitespace.
_QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)


# ---------------------------------------------------------------------------------------------
# Records


def _looks_like_path(source: str) -> bool:
    return source.endswith(_FILE_SUFFIXES) or source.startswith((".", "/", "~")) or Path(
        source
    ).exists()


def _read_json_records(path: Path) -> Records:
    """The records of a .json file (one JSON array of objects, or JSON lines) or a .jsonl file
    (JSON lines: one object per line), each with its `file:line`."""
    # utf-8-sig: a byte-order mark (as some Windows editors write) is not part of the JSON.
    text = path.read_text(encoding="utf-8-sig")
    json_lines = "JSON lines (one record object per line)"
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items, lines = _json_array(text)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"data: {path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}); expected "
                "a JSON array of record objects."
            ) from e
    else:
        if path.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                data = None  # not one JSON document: JSON lines, read below
            if isinstance(data, dict) and "\n" in text.strip():
                # One line holding one object is JSON lines with one record; an object spread
                # over lines is neither format, and guessing where its records are would be a
                # guess.
                raise ValueError(
                    f"data: {path} holds one JSON object spread over several lines (keys "
                    f"{sorted(data)}); expected a JSON array of record objects ([{{...}}, "
                    f"{{...}}]) or {json_lines}."
                )
        expected = f"a JSON array of record objects or {json_lines}" if (
            path.suffix == ".json") else json_lines
        items, lines = [], []
        # "\n" only: str.splitlines also splits at U+2028 and other separators that JSON allows
        # inside a string, and editors number lines by "\n".
        for line_no, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"data: {path}:{line_no}: not valid JSON ({e.msg}, column {e.colno}); "
                    f"expected {expected}."
                ) from e
            lines.append(line_no)
    records = Records(items, [f"{path}:{n}" for n in lines])
    for record, where in zip(records, records.locations):
        if not isinstance(record, dict):
            raise ValueError(f"data: {where}: expected a JSON object (one per record). Got a "
                             f"JSON {_json_type(record)}.")
    return records


def _json_array(text: str) -> tuple[list[Any], list[int]]:
    """The items of the JSON array `text` and the 1-based line each one starts on."""
    items = json.loads(text)  # a malformed document raises here, with its line
    decoder = json.JSONDecoder()
    lines, line, counted = [], 1, 0
    pos = text.index("[") + 1
    for _ in items:
        pos = _JSON_SPACE.match(text, pos).end()
        line += text.count("\n", counted, pos)
        counted = pos
        lines.append(line)
        _, pos = decoder.raw_decode(text, pos)
        pos = _JSON_SPACE.match(text, pos).end() + 1  # past the ',' (or the closing ']')
    return items, lines


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


class Records(list):
    """The records (dicts) of a data source, in order, with where each one is: `file:line` (the
    1-based line it starts on) for .json and .jsonl files, `file row N` (1-based) for parquet and
    `name (split) row N` for a `datasets` name. Errors about a record name it by its location."""

    def __init__(self, records: Sequence[dict[str, Any]], locations: Sequence[str]) -> None:
        super().__init__(records)
        if len(locations) != len(records):
            raise ValueError(f"data: {len(records)} records need as many locations. Got "
                             f"{len(locations)}.")
        self.locations = list(locations)


def load_records(source: str | Path, *, split: str = "train") -> Records:
    """Records (dicts) from a local .json (one JSON array of objects, or JSON lines) / .jsonl
    (JSON lines) / .parquet file, or from a `datasets` name (its `split`), with the location of
    each (`Records`).

    Raises:
        FileNotFoundError: `source` looks like a path (has a data-file suffix or starts with
            '.', '/' or '~') and does not exist.
        ValueError: the file holds no records, or is not in a supported format; or `source` is
            not a file and `datasets` cannot load it (unknown, offline and not cached, no such
            split).
    """
    source = str(source)
    if _looks_like_path(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data: file not found: {path}")
        if path.suffix in (".json", ".jsonl"):
            records = _read_json_records(path)
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq  # a dependency of `datasets`; imported only here

            rows = pq.read_table(path).to_pylist()
            records = Records(rows, [f"{path} row {i}" for i in range(1, len(rows) + 1)])
        else:
            raise ValueError(
                f"data: unsupported file type {path.suffix!r} for {path}; expected one of "
                f"{', '.join(_FILE_SUFFIXES)}."
            )
    else:
        try:
            import datasets
        except ImportError as e:
            raise ValueError(
                f"data: {source!r} is not a local file, and loading a dataset by name needs the "
                "`datasets` package, which is not installed."
            ) from e
        try:
            rows = datasets.load_dataset(source, split=split).to_list()
        except (OSError, ValueError) as e:
            # Not found, not reachable (offline: ConnectionError is an OSError), no such split.
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"data: {source!r} is neither a local file nor a dataset `datasets` can load "
                f"(split {split!r}): {reason}. Give a .json/.jsonl/.parquet file, or a dataset "
                "name that is cached or reachable on the Hub."
            ) from e
        records = Records(rows, [f"{source} ({split}) row {i}" for i in range(1, len(rows) + 1)])
    if not records:
        raise ValueError(f"data: {source} holds no records (the dataset is empty).")
    return records


def _locations(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Where each record is: `Records.locations`, or `records[i]` for records given in memory."""
    if isinstance(records, Records):
        return records.locations
    return [f"records[{i}]" for i in range(len(records))]


def detect_format(records: Sequence[Mapping[str, Any]]) -> str:
    """'chat' for records with a `messages` column, 'prompt_completion' for `prompt` and
    `completion` columns; a ValueError naming the columns found otherwise."""
    columns = set(records[0]) if records else set()
    if "messages" in columns:
        return "chat"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    where = f"{_locations(records)[0]}: " if records else ""
    raise ValueError(
        f"data: {where}expected a 'messages' column (chat format) or 'prompt' and 'completion' "
        f"columns. Got columns {sorted(columns)}."
    )


# ---------------------------------------------------------------------------------------------
# Tokenization


@dataclasses.dataclass(frozen=True, slots=True)
class Example:
    """One tokenized record: labels are the input ids, -100 where no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    where: str | None = None
    """The record's location (`Records.locations`), for errors; None for an example made
    otherwise."""


def _field(record: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in record:
        raise ValueError(f"data: {where}: expected a {key!r} field. Got fields {sorted(record)}.")
    return record[key]


def _prompt_completion(tokenizer: Any, record: Mapping[str, Any], where: str) -> Example:
    prompt, completion = _field(record, "prompt", where), _field(record, "completion", where)
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise ValueError(
            f"data: {where}: 'prompt' and 'completion' must be strings. Got "
            f"{type(prompt).__name__} and {type(completion).__name__}."
        )
    # Tokenized apart so the loss mask falls exactly on the completion's tokens.
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    return Example(
        input_ids=prompt_ids + completion_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + completion_ids, where=where,
    )


def _message_problem(message: Any) -> str | None:
    """What is wrong with one message of a chat record, None if nothing."""
    if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
        got = f"keys {sorted(message)}" if isinstance(message, Mapping) else type(message).__name__
        return f"must be an object with 'role' and 'content'. Got {got}."
    if message["role"] not in CHAT_ROLES:
        return f"has role {message['role']!r}; expected one of {CHAT_ROLES}."
    if not isinstance(message["content"], str):
        return (
            f"({message['role']}) must have a string 'content'. Got "
            f"{type(message['content']).__name__}."
        )
    return None


def _chat(tokenizer: Any, record: Mapping[str, Any], where: str) -> Example:
    messages = _field(record, "messages", where)
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if messages == [] else type(messages).__name__
        raise ValueError(
            f"data: {where}: 'messages' must be a non-empty list of {{'role', 'content'}} "
            f"objects. Got {got}."
        )
    for j, message in enumerate(messages):
        problem = _message_problem(message)
        if problem is not None:
            raise ValueError(f"data: {where}: messages[{j}] {problem}")
    if not any(m["role"] == "assistant" for m in messages):
        # The loss is taken on assistant replies only: such a record would train on nothing.
        raise ValueError(
            f"data: {where}: no 'assistant' message, so nothing to train on; every chat record "
            f"needs at least one assistant reply. Got roles "
            f"{[m['role'] for m in messages]}."
        )
    if tokenizer.chat_template is None:
        raise ValueError("data: chat records need a tokenizer with a chat template; it has none.")

    def render(msgs: list, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=generation_prompt
        )

    text = render(messages, False)
    spans = []  # character spans of the assistant replies, where the loss is taken
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError(
                f"data: {where}: the tokenizer's chat template does not render a "
                "conversation as the concatenation of its turns, so the assistant replies cannot "
                "be located for the loss mask."
            )
        spans.append((len(before), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [
        token if any(s <= begin < e for s, e in spans) else IGNORE_INDEX
        for token, (begin, _) in zip(ids, encoded["offset_mapping"])
    ]
    return Example(input_ids=ids, labels=labels, where=where)


def tokenize_records(
    records: Sequence[Mapping[str, Any]], tokenizer: Any, *, fmt: str | None = None
) -> list[Example]:
    """Token ids and loss labels for each record: one `Example` per record, in order, with the
    record's location (`Records`, or `records[i]` for records made in memory).

    fmt 'prompt_completion': prompt ids (with the tokenizer's special tokens) + completion ids +
    eos; the loss is on the completion and eos. fmt 'chat': the conversation through the
    tokenizer's chat template; the loss is on the assistant replies. None: `detect_format`.

    Raises:
        ValueError: missing or mistyped fields, a chat message with a role not in `CHAT_ROLES`,
            a chat record without an assistant message, or no record with any label token.
    """
    fmt = detect_format(records) if fmt is None else fmt
    if fmt not in FORMATS:
        raise ValueError(f"data: format must be one of {FORMATS}. Got {fmt!r}.")
    make = _chat if fmt == "chat" else _prompt_completion
    examples = [make(tokenizer, r, where) for r, where in zip(records, _locations(records))]
    if not any(_has_labels(ex.labels) for ex in examples):
        raise ValueError(
            f"data: none of the {len(examples)} records has a token to train on (every "
            "completion / assistant reply is empty)."
        )
    return examples


def split_eval(
    examples: Sequence[Example], *, eval_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, eval): `eval_fraction` of the examples (at least 1 when > 0) held out, picked by a
    shuffle fixed by `seed`."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"data: eval_fraction must be in [0, 1). Got {eval_fraction}.")
    n_eval = math.ceil(len(examples) * eval_fraction) if eval_fraction > 0 else 0
    if n_eval >= len(examples):
        raise ValueError(
            f"data: {len(examples)} examples are too few to hold out {n_eval} for evaluation "
            "and still train; lower --eval-fraction or add data."
        )
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = set(order[:n_eval])
    train = [ex for i, ex in enumerate(examples) if i not in held_out]
    return train, [examples[i] for i in sorted(held_out)]


# ---------------------------------------------------------------------------------------------
# Rows and batches


@dataclasses.dataclass(frozen=True, slots=True)
class OverlongCounts:
    """What `make_rows` did to the examples longer than max_len."""

    truncated: int = 0
    """Examples cut to their first max_len tokens (overlong='truncate')."""
    truncated_to_no_labels: int = 0
    """Of the truncated examples, those that had label tokens and lost every one: they are in the
    rows, but train on nothing."""
    split: int = 0
    """Examples cut into pieces (overlong='split')."""


@dataclasses.dataclass(frozen=True, slots=True)
class Rows:
    """Fixed-length rows of token ids on the host, shape (rows, max_len) each.

    Packed rows carry `position_ids` (restarting at 0 per document) and no attention mask;
    padded rows carry `attention_mask` and no position ids. `real_tokens[r]` counts row r's
    non-pad tokens; `overlong` counts the examples cut to fit.
    """

    input_ids: Tensor
    labels: Tensor
    real_tokens: Tensor
    position_ids: Tensor | None = None
    attention_mask: Tensor | None = None
    overlong: OverlongCounts = OverlongCounts()

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def make_rows(
    examples: Sequence[Example], *, max_len: int, pad_id: int, packing: bool = True,
    overlong: str = "error",
) -> Rows:
    """Rows of length `max_len`: packed best-fit-decreasing by `chronicals.packing.pack`, or one
    example per row, right-padded with `pad_id`.

    overlong: what to do with an example longer than max_len: 'error' (default; nothing is cut
    without being asked: `check_lengths`), 'truncate' (keep its first max_len tokens), 'split'
    (cut it into pieces of at most max_len tokens, each a document or row of its own). A piece's
    first label is never scored (no token before it in the piece predicts it), so consecutive
    pieces overlap by one token: the label the next piece cannot score is the last one of the
    piece before, and every label of the example is scored exactly once. `Rows.overlong` counts
    both, and the truncated examples that lost all their label tokens.
    """
    if max_len < 2:
        raise ValueError(f"data: max_len must be >= 2 (one input and one label). Got {max_len}.")
    if not examples:
        raise ValueError("data: no examples to make rows from.")
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"data: overlong must be one of {OVERLONG_POLICIES}. Got {overlong!r}.")
    if overlong == "error":
        check_lengths(examples, max_len)
    fitted, counts = _fit(examples, max_len, overlong)
    rows = (_packed_rows if packing else _padded_rows)(fitted, max_len=max_len, pad_id=pad_id)
    cut = {
        "error": "",
        "truncate": f"; {counts.truncated} truncated to max_len, "
        f"{counts.truncated_to_no_labels} of them losing every label token",
        "split": f"; {counts.split} split into pieces of max_len",
    }[overlong]
    logger.info(
        "%d examples in %d %s rows of %d tokens (%.1f%% of slots are real tokens)%s",
        len(examples), len(rows), "packed" if packing else "padded", max_len,
        100 * rows.real_tokens.sum().item() / rows.input_ids.numel(), cut,
    )
    return dataclasses.replace(rows, overlong=counts)


def check_lengths(examples: Sequence[Example], max_len: int) -> None:
    """A ValueError if any example is longer than `max_len` tokens, with how many are and which
    is the longest (by its record's location, or else its index in `examples`)."""
    lengths = [len(ex.input_ids) for ex in examples]
    over = [i for i, n in enumerate(lengths) if n > max_len]
    if over:
        longest = max(over, key=lengths.__getitem__)
        where = examples[longest].where or f"examples[{longest}]"
        raise ValueError(
            f"data: {len(over)} of {len(lengths)} examples are longer than max_len={max_len} "
            f"tokens (the longest, {where}, has {lengths[longest]}). Raise --max-len, "
            "or pass --overlong truncate / split to cut them."
        )


def _has_labels(labels: Sequence[int]) -> bool:
    """Whether a causal-LM loss scores any of `labels` (the first is never scored)."""
    return any(label != IGNORE_INDEX for label in labels[1:])


def _fit(
    examples: Sequence[Example], max_len: int, overlong: str
) -> tuple[list[Example], OverlongCounts]:
    """`examples` with each one longer than max_len truncated or split (see `make_rows`)."""
    fitted: list[Example] = []
    truncated = truncated_to_no_labels = split = 0
    for ex in examples:
        n = len(ex.input_ids)
        if n <= max_len:
            fitted.append(ex)
        elif overlong == "truncate":
            fitted.append(Example(input_ids=ex.input_ids[:max_len], labels=ex.labels[:max_len]))
            truncated += 1
            truncated_to_no_labels += _has_labels(ex.labels) and not _has_labels(fitted[-1].labels)
        else:
            fitted += [
                Example(input_ids=ex.input_ids[s : s + k], labels=ex.labels[s : s + k])
                for s, k in split_pieces(n, max_len)
            ]
            split += 1
    return fitted, OverlongCounts(
        truncated=truncated, truncated_to_no_labels=truncated_to_no_labels, split=split
    )


def _padded_rows(examples: Sequence[Example], *, max_len: int, pad_id: int) -> Rows:
    n = len(examples)
    input_ids = torch.full((n, max_len), pad_id, dtype=torch.int64)
    labels = torch.full((n, max_len), IGNORE_INDEX, dtype=torch.int64)
    attention_mask = torch.zeros((n, max_len), dtype=torch.int64)
    for r, ex in enumerate(examples):
        k = len(ex.input_ids)
        input_ids[r, :k] = torch.tensor(ex.input_ids)
        labels[r, :k] = torch.tensor(ex.labels)
        attention_mask[r, :k] = 1
    return Rows(input_ids=input_ids, labels=labels, real_tokens=attention_mask.sum(1),
                attention_mask=attention_mask)


def _packed_rows(examples: Sequence[Example], *, max_len: int, pad_id: int) -> Rows:
    # The examples fit already (`_fit`), so pack's own overlong policy never applies.
    packed = pack(
        [{"input_ids": ex.input_ids, "labels": ex.labels} for ex in examples],
        max_len=max_len, pad_id=pad_id, ignore_index=IGNORE_INDEX,
    )
    real_tokens = torch.tensor([sum(d.length for d in row) for row in packed.documents])
    return Rows(
        input_ids=packed.input_ids, labels=packed.labels, position_ids=packed.position_ids,
        real_tokens=real_tokens,
    )


def row_order(num_rows: int, epoch: int, seed: int) -> list[int]:
    """The order rows are visited in during `epoch`: a permutation fixed by (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_rows, generator=g).tolist()


def batch_at(
    rows: Rows, cursor: int, batch_size: int, *, seed: int
) -> tuple[dict[str, Any], int]:
    """The micro-batch of `batch_size` rows starting at position `cursor` of the endless stream
    row_order(epoch 0) + row_order(epoch 1) + ..., as model inputs on the host, and the number of
    real (non-pad) tokens in it."""
    n = len(rows)
    orders: dict[int, list[int]] = {}
    index = []
    for pos in range(cursor, cursor + batch_size):
        epoch, offset = divmod(pos, n)
        if epoch not in orders:
            orders[epoch] = row_order(n, epoch, seed)
        index.append(orders[epoch][offset])
    return select(rows, index), int(rows.real_tokens[index].sum())


def select(rows: Rows, index: Sequence[int]) -> dict[str, Any]:
    """Model inputs for the rows `index`; packed rows also get the attention's segment boundaries
    (`chronicals.packing.varlen_kwargs`, as `PackedBatch.model_inputs` gives them), on the
    host."""
    batch: dict[str, Any] = {"input_ids": rows.input_ids[index], "labels": rows.labels[index]}
    if rows.position_ids is not None:
        positions = rows.position_ids[index]
        batch.update(position_ids=positions, **varlen_kwargs(positions))
    if rows.attention_mask is not None:
        batch["attention_mask"] = rows.attention_mask[index]
    return batch


def eval_batches(rows: Rows, batch_size: int) -> list[dict[str, Any]]:
    """All rows in order, in batches of `batch_size`; the last batch is filled up with copies of
    its first row whose labels are all ignored, so every batch has one shape (no recompile)."""
    batches = []
    for start in range(0, len(rows), batch_size):
        index = list(range(start, min(start + batch_size, len(rows))))
        batch = select(rows, index + [index[0]] * (batch_size - len(index)))
        batch["labels"][len(index):] = IGNORE_INDEX
        batches.append(batch)
    return batches
