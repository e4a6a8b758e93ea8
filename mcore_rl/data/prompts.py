"""Prompt datasets: read rows from the toy task, parquet, jsonl or `datasets.save_to_disk` folders,
turn each into a `Prompt` (text, token ids, ground truth) and report bad rows by file
and row so a broken data file is found before, not during, a long run.

Layouts understood: a string prompt column, or chat messages (``[{"role", "content"}, ...]``, verl's
layout) rendered with the tokenizer's chat template; the ground truth from a dotted key such as
``reward_model.ground_truth`` (verl) or ``answer`` (GSM8K).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

logger = logging.getLogger(__name__)

# Tried in order when answer_key is not given.
DEFAULT_ANSWER_KEYS = ("reward_model.ground_truth", "ground_truth", "answer")
TOY_DATASET_SIZE = 1024
VAL_SPLITS = ("test", "val", "validation")  # names of a validation split


@dataclass
class Prompt:
    """One prompt, ready for rollout and reward.

    `prompt` is the text the model sees (after the chat template, if any); `raw_prompt` is the row's
    value as stored; `input_ids` is `prompt` tokenized (None without a tokenizer); `where` says which
    file and row it came from, for error messages downstream.
    """

    prompt: str
    raw_prompt: Any
    ground_truth: Any = None
    input_ids: list[int] | None = None
    where: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class BadRow:
    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


class BadRowError(ValueError):
    """A bad row met with on_bad_row='error'; the message names the file and row."""


class PromptDataset(Sequence):
    """The loaded prompts plus the bad rows that were skipped (so callers can report or assert on them)."""

    def __init__(self, prompts: list[Prompt], bad_rows: list[BadRow], source: str):
        self.prompts = prompts
        self.bad_rows = bad_rows
        self.source = source

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i):
        return self.prompts[i]

    def __repr__(self) -> str:
        return f"PromptDataset({self.source!r}, {len(self.prompts)} prompts, {len(self.bad_rows)} bad rows skipped)"


# ---------------------------------------------------------------------------------------------- reading


def _iter_jsonl(path: str) -> Iterator[tuple[str, Any]]:
    """(where, row) per non-blank line; a line that is not UTF-8 or not JSON is yielded as its
    error (lines are decoded one by one, so one bad byte costs one row, not the file)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno} (row {lineno - 1})"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, ValueError(f"not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, e


def _iter_json(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        head = f.read(1 << 16).lstrip()
    if head.startswith(b"["):  # a JSON array of rows: one document, so a bad byte fails it whole
        try:
            with open(path, encoding="utf-8") as f:
                rows = json.load(f)
        except ValueError as e:  # UnicodeDecodeError, JSONDecodeError
            raise ValueError(f"{path}: not a readable JSON array of rows ({type(e).__name__}: {e})") from None
        for i, row in enumerate(rows):
            yield f"{path} row {i}", row
    else:
        yield from _iter_jsonl(path)


def _iter_parquet(path: str) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is a dependency
        raise ImportError("reading parquet needs pyarrow: pip install pyarrow") from e
    pf = pq.ParquetFile(path)
    row = 0
    for batch in pf.iter_batches(batch_size=4096):  # bounded memory on large files
        for rec in batch.to_pylist():
            yield f"{path} row {row}", rec
            row += 1


def _iter_hf_disk(path: str, split: str | None) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"{path!r} is a `datasets.save_to_disk` folder; reading it needs: "
                          "pip install datasets") from e
    ds = datasets.load_from_disk(path)
    label = path
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if "train" in ds:
                split = "train"
            elif len(ds) == 1:
                split = next(iter(ds))
            else:
                raise ValueError(f"{path!r} holds splits {list(ds)}; choose one with split=")
        if split not in ds:
            raise ValueError(f"{path!r} has no split {split!r}; splits: {list(ds)}")
        ds = ds[split]
        label = f"{path}[{split}]"
    for i, rec in enumerate(ds):
        yield f"{label} row {i}", rec


def _is_hf_disk(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "dataset_info.json", "state.json"))


def _resolve_dir(path: str, split: str | None) -> str:
    """A folder of split files (verl's ``data/gsm8k/{train,test}.parquet``): pick the split's file."""
    split = split or "train"
    for ext in (".parquet", ".jsonl", ".json"):
        cand = os.path.join(path, split + ext)
        if os.path.isfile(cand):
            return cand
    files = sorted(os.listdir(path))
    raise FileNotFoundError(
        f"{path!r} is neither a `datasets.save_to_disk` folder nor holds {split}.parquet/.jsonl/.json "
        f"(it has: {', '.join(files[:20]) or 'nothing'})"
    )


def iter_rows(source: str, split: str | None = None, toy_size: int = TOY_DATASET_SIZE,
              seed: int = 0) -> Iterator[tuple[str, Any]]:
    """(where, row dict) for every row of `source`; for "toy", `split` "test" (or "val") is the
    toy task's validation split, anything else its training rows."""
    if source == "toy":
        from mcore_rl.toy import toy_prompts, toy_val_prompts

        val = split in VAL_SPLITS
        rows = toy_val_prompts() if val else toy_prompts(toy_size, seed=seed)
        for i, r in enumerate(rows):
            yield (f"toy {split} row {i}" if val else f"toy row {i}"), {
                "prompt": r["prompt"], "reward_model": {"ground_truth": r["ground_truth"]}}
        return
    path = os.path.expanduser(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"prompt source not found: {source!r} (give 'toy', a .parquet/.jsonl/.json "
                                "file, or a folder)")
    if os.path.isdir(path):
        if _is_hf_disk(path):
            yield from _iter_hf_disk(path, split)
            return
        path = _resolve_dir(path, split)
    if path.endswith(".parquet"):
        yield from _iter_parquet(path)
    elif path.endswith(".jsonl"):
        yield from _iter_jsonl(path)
    elif path.endswith(".json"):
        yield from _iter_json(path)
    else:
        raise ValueError(f"unsupported prompt file {path!r}: use .parquet, .jsonl or .json")


# ---------------------------------------------------------------------------------------------- rows -> prompts

_MISSING = object()


def get_key(row: Any, key: str, default=_MISSING):
    """``row["a"]["b"]`` for key ``"a.b"``; a literal dotted column name wins if present."""
    if isinstance(row, dict) and key in row:
        return row[key]
    cur = row
    for part in key.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            return default
    return cur


def _check_messages(messages: Any) -> str | None:
    """Why `messages` is not a usable chat, or None."""
    if len(messages) == 0:
        return "prompt is an empty message list"
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"prompt message {j} is not a {{role, content}} dict: {str(m)[:80]!r}"
    if not any(isinstance(m["content"], str) and m["content"].strip() for m in messages):
        return "prompt messages have no text"
    return None


def _load_tokenizer(tokenizer):
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer))
    return tokenizer


def load_prompts(
    source: str | os.PathLike | Iterable[str | os.PathLike],
    prompt_key: str = "prompt",
    answer_key: str | None = None,
    split: str | None = None,
    tokenizer=None,
    max_prompt_length: int | None = None,
    apply_chat_template: bool | None = None,
    on_bad_row: str = "skip",
    toy_size: int = TOY_DATASET_SIZE,
    seed: int = 0,
    extra_keys: Sequence[str] = ("data_source", "extra_info"),
) -> PromptDataset:
    """Read prompts from `source`: ``"toy"``, a .parquet/.jsonl/.json file, a folder, or a list of them.

    * `answer_key`: dotted key of the ground truth; None tries ``reward_model.ground_truth``,
      ``ground_truth``, ``answer`` (rows with none get ground_truth None). A key given explicitly must
      be present in every row.
    * `apply_chat_template`: None renders chat-message prompts with the tokenizer's template and
      leaves strings as they are; True also wraps strings as one user message; False never renders
      (message prompts are then an error).
    * `tokenizer` (object or path): fills `input_ids`; `max_prompt_length` (tokens) needs it.
    * `on_bad_row`: "skip" logs and records bad rows (missing or empty prompt, too long, undecodable,
      missing explicit answer key) in `.bad_rows`; "error" raises `BadRowError` at the first one.
    * `split`: for `datasets` folders with several splits, or folders holding ``<split>.parquet``.
    """
    if on_bad_row not in ("skip", "error"):
        raise ValueError(f"on_bad_row must be 'skip' or 'error', got {on_bad_row!r}")
    if max_prompt_length is not None and tokenizer is None:
        raise ValueError("max_prompt_length is in tokens: pass a tokenizer too")
    tokenizer = _load_tokenizer(tokenizer)
    if apply_chat_template and tokenizer is None:
        raise ValueError("apply_chat_template=True needs a tokenizer")
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not sources:
        raise ValueError("load_prompts: no source given")

    prompts: list[Prompt] = []
    bad: list[BadRow] = []

    def reject(where: str, reason: str):
        if on_bad_row == "error":
            raise BadRowError(f"{where}: {reason}")
        bad.append(BadRow(where, reason))

    for src in sources:
        src = os.fspath(src)
        for where, row in iter_rows(src, split=split, toy_size=toy_size, seed=seed):
            if isinstance(row, Exception):
                reject(where, f"cannot parse row: {row}")
                continue
            if not isinstance(row, dict):
                reject(where, f"row is a {type(row).__name__}, not an object with columns")
                continue
            raw = get_key(row, prompt_key)
            if raw is _MISSING:
                reject(where, f"no prompt column {prompt_key!r} (columns: {', '.join(map(str, row))})")
                continue
            if raw is None or (isinstance(raw, str) and not raw.strip()):
                reject(where, f"empty prompt in column {prompt_key!r}")
                continue
            if isinstance(raw, (list, tuple)):
                problem = _check_messages(raw)
                if problem:
                    reject(where, problem)
                    continue
                if tokenizer is None:
                    raise ValueError(f"{where}: prompts are chat messages; pass a tokenizer to render them "
                                     "with its chat template")
                if apply_chat_template is False:
                    raise ValueError(f"{where}: prompts are chat messages but apply_chat_template=False")
                messages = [dict(m) for m in raw]
            elif isinstance(raw, str):
                messages = [{"role": "user", "content": raw}] if apply_chat_template else None
            else:
                reject(where, f"prompt is a {type(raw).__name__}; expected a string or a list of messages")
                continue

            if messages is not None:
                if not getattr(tokenizer, "chat_template", None):
                    raise ValueError(f"{where}: the tokenizer has no chat template to render chat prompts with; "
                                     "use string prompts or a tokenizer with one")
                try:
                    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                except Exception as e:  # e.g. a template that rejects this row's role order
                    reject(where, f"chat template failed: {type(e).__name__}: {e}")
                    continue
                add_special = False  # the template already holds BOS and the like
            else:
                text = raw
                add_special = True

            if answer_key is not None:
                gt = get_key(row, answer_key)
                if gt is _MISSING:
                    reject(where, f"no answer column {answer_key!r}")
                    continue
            else:
                gt = None
                for k in DEFAULT_ANSWER_KEYS:
                    v = get_key(row, k)
                    if v is not _MISSING:
                        gt = v
                        break

            ids = None
            if tokenizer is not None:
                ids = list(tokenizer(text, add_special_tokens=add_special)["input_ids"])
                if max_prompt_length is not None and len(ids) > max_prompt_length:
                    reject(where, f"prompt is {len(ids)} tokens, over max_prompt_length={max_prompt_length}")
                    continue
            extra = {k: v for k in extra_keys if (v := get_key(row, k)) is not _MISSING}
            prompts.append(Prompt(prompt=text, raw_prompt=raw, ground_truth=gt, input_ids=ids, where=where,
                                  extra=extra))

    label = ", ".join(map(os.fspath, sources))
    if bad:
        shown = "\n  ".join(str(b) for b in bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        logger.warning("skipped %d bad prompt rows of %s:\n  %s%s", len(bad), label, shown, more)
    if not prompts:
        reasons = f"; first bad row: {bad[0]}" if bad else ""
        raise ValueError(f"no usable prompts in {label}{reasons}")
    return PromptDataset(prompts, bad, label)
