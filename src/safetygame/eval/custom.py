"""A user's own evaluation data: labelled prompts or multiple-choice items in JSONL or CSV.

``safetygame eval custom FILE`` and ``safetygame tune FILE`` read the file with
:func:`load_custom`, which validates every row before anything else happens (no model call,
no output file): a malformed row raises :class:`~safetygame.errors.ConfigError` naming the
file, the line and the field. The formats (docs/evaluation.md, "Your own data"):

- **refusal study** (like XSTest): ``prompt`` and ``label`` (``safe`` or ``unsafe``);
- **accuracy study** (like HHH, TruthfulQA): ``question``, the options and the ``answer``:
  in JSONL ``options`` (a list of >= 2 strings) and ``answer`` (the 0-based index of the
  correct option); in CSV the columns ``A``, ``B``, ... (>= 2, empty cells at the end for
  items with fewer options) and ``answer`` (the letter of the correct column).

Both take an optional ``id`` (unique; default a hash of the row's text, so reordering or
appending rows never moves an item between dev and test) and ``category``. Which study a file
is comes from its fields; one file holds one kind.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from safetygame.errors import ConfigError
from safetygame.eval.datasets import MCItem, PromptItem

__all__ = ["BENCHMARK", "CustomData", "describe", "load_custom"]

BENCHMARK = "custom"
Kind = Literal["mc", "open"]
LETTERS = string.ascii_uppercase
_MAX_ERRORS = 10  # listed in one error; a file with more is reported as "and N more"

_OPEN_FIELDS = {"id", "prompt", "label", "category"}
_MC_FIELDS = {"id", "question", "options", "answer", "category"}


@dataclass(frozen=True)
class CustomData:
    """A validated file: its kind (``open``: refusal study, ``mc``: accuracy study), its items
    and the sha256 of its bytes (recorded in the EvalLog and the tuned policy)."""

    path: Path
    kind: Kind
    items: tuple[MCItem, ...] | tuple[PromptItem, ...]
    sha256: str

    @property
    def name(self) -> str:
        """The run's benchmark name: ``custom:<file stem>``."""
        return f"{BENCHMARK}:{self.path.stem}"

    @property
    def mc_items(self) -> list[MCItem]:
        return [it for it in self.items if isinstance(it, MCItem)]

    @property
    def prompt_items(self) -> list[PromptItem]:
        return [it for it in self.items if isinstance(it, PromptItem)]


class _RowError(Exception):
    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _text(row: dict[str, Any], key: str) -> str:
    v = row.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        raise _RowError(key, "is missing or empty")
    if not isinstance(v, str):
        raise _RowError(key, f"must be a string (got {type(v).__name__})")
    return v.strip()


def _optional(row: dict[str, Any], key: str) -> str | None:
    v = row.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    if isinstance(v, bool) or not isinstance(v, str | int):
        raise _RowError(key, f"must be a string (got {type(v).__name__})")
    return str(v).strip()


def _content_id(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def _kind_of(row: dict[str, Any], csv_mode: bool) -> Kind:
    if "prompt" in row or "label" in row:
        return "open"
    if "question" in row:
        return "mc"
    wanted = (
        "prompt,label (refusal study) or question,A,B,...,answer"
        if csv_mode
        else ('"prompt" and "label" (refusal study) or "question", "options" and "answer"')
    )
    raise _RowError(None, f"expected the fields {wanted}")


def _prompt_item(row: dict[str, Any], stem: str) -> PromptItem:
    prompt = _text(row, "prompt")
    label = _text(row, "label").lower()
    if label not in ("safe", "unsafe"):
        raise _RowError("label", f"must be safe or unsafe (got {row.get('label')!r})")
    rid = _optional(row, "id") or _content_id("prompt", prompt)
    return PromptItem(
        id=rid,
        benchmark=BENCHMARK,
        subset=stem,
        prompt=prompt,
        label="safe" if label == "safe" else "unsafe",
        category=_optional(row, "category"),
    )


def _mc_item(
    question: str, options: list[str], answer: int, row: dict[str, Any], stem: str
) -> MCItem:
    rid = _optional(row, "id") or _content_id("mc", question, *options)
    return MCItem(
        id=rid,
        benchmark=BENCHMARK,
        subset=stem,
        question=question,
        options=tuple(options),
        labels=tuple(1.0 if i == answer else 0.0 for i in range(len(options))),
        category=_optional(row, "category"),
    )


def _json_mc(row: dict[str, Any], stem: str) -> MCItem:
    question = _text(row, "question")
    opts = row.get("options")
    if not isinstance(opts, list) or len(opts) < 2:
        raise _RowError("options", "must be a list of at least 2 strings")
    options = []
    for i, o in enumerate(opts):
        if not isinstance(o, str) or not o.strip():
            raise _RowError(f"options[{i}]", "must be a non-empty string")
        options.append(o.strip())
    ans = row.get("answer")
    if isinstance(ans, bool) or not isinstance(ans, int):
        raise _RowError("answer", f"must be the 0-based index of the correct option (got {ans!r})")
    if not 0 <= ans < len(options):
        raise _RowError("answer", f"must be in 0..{len(options) - 1} (got {ans})")
    return _mc_item(question, options, ans, row, stem)


def _csv_mc(row: dict[str, Any], stem: str) -> MCItem:
    question = _text(row, "question")
    options: list[str] = []
    ended_at: str | None = None
    for letter in LETTERS:
        if letter not in row:
            break
        cell = (row[letter] or "").strip()
        if not cell:
            ended_at = ended_at or letter
            continue
        if ended_at is not None:
            raise _RowError(letter, f"has an option after the empty column {ended_at}")
        options.append(cell)
    if len(options) < 2:
        raise _RowError("A" if not options else "B", "needs at least 2 options (columns A, B)")
    ans = (row.get("answer") or "").strip().upper()
    if len(ans) != 1 or ans not in LETTERS[: len(options)]:
        raise _RowError(
            "answer",
            f"must be one of {', '.join(LETTERS[: len(options)])} (got {row.get('answer')!r})",
        )
    return _mc_item(question, options, LETTERS.index(ans), row, stem)


def _jsonl_rows(text: str) -> Iterator[tuple[int, dict[str, Any] | _RowError]]:
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield n, _RowError(None, f"not JSON ({exc.msg})")
            continue
        if not isinstance(obj, dict):
            yield n, _RowError(None, "expected a JSON object")
            continue
        yield n, obj


def _csv_rows(text: str) -> Iterator[tuple[int, dict[str, Any] | _RowError]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return
    header = [h.strip() for h in header]
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        yield 1, _RowError(dupes[0], "appears twice in the header")
        return
    if "question" in header:
        letters = [h for h in header if len(h) == 1 and h in LETTERS]
        if letters != list(LETTERS[: len(letters)]):
            yield 1, _RowError("A", "the option columns must be A, B, C, ... in order")
            return
    start = reader.line_num + 1
    for cells in reader:
        line = start
        start = reader.line_num + 1
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            yield line, _RowError(None, f"has {len(cells)} cells but the header has {len(header)}")
            continue
        yield line, dict(zip(header, cells, strict=True))


def load_custom(path: str | Path) -> CustomData:
    """Read and validate a whole JSONL (``.jsonl``) or CSV (``.csv``) file of labelled items.

    Every row is checked before returning; problems raise :class:`ConfigError` listing
    ``file:line: field: what is wrong`` for up to ten rows. Needs at least two items (one
    for dev, one for test) and unique ids.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise ConfigError(
            f"{p}: expected a .jsonl or .csv file (docs/evaluation.md, Your own data)"
        )
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start})") from None
    csv_mode = suffix == ".csv"
    rows = _csv_rows(text) if csv_mode else _jsonl_rows(text)
    errors: list[str] = []
    items: list[MCItem | PromptItem] = []
    kind: Kind | None = None
    first_line: dict[str, int] = {}
    known = (_OPEN_FIELDS, _MC_FIELDS)
    for line, row in rows:
        try:
            if isinstance(row, _RowError):
                raise row
            k = _kind_of(row, csv_mode)
            if kind is None:
                kind = k
            elif k != kind:
                what = "a prompt (refusal study)" if k == "open" else "a question (accuracy study)"
                raise _RowError(
                    None, f"is {what}, but the file's first row is not: one kind a file"
                )
            allowed = known[0] if k == "open" else known[1]
            extra = [
                f
                for f in row
                if f not in allowed
                and not (csv_mode and k == "mc" and len(f) == 1 and f in LETTERS)
            ]
            if extra:
                raise _RowError(extra[0], "is not a known field (typo?)")
            if k == "open":
                item: MCItem | PromptItem = _prompt_item(row, p.stem)
            else:
                item = _csv_mc(row, p.stem) if csv_mode else _json_mc(row, p.stem)
            if item.id in first_line:
                given = "id" in row and _optional(row, "id")
                field = "id" if given else ("prompt" if k == "open" else "question")
                raise _RowError(field, f"repeats line {first_line[item.id]} (ids must be unique)")
            first_line[item.id] = line
            items.append(item)
        except _RowError as err:
            where = f"{p}:{line}" + (f": field {err.field!r}" if err.field else "")
            errors.append(f"{where} {err.message}" if err.field else f"{where}: {err.message}")
    if errors:
        more = len(errors) - _MAX_ERRORS
        shown = errors[:_MAX_ERRORS] + ([f"... and {more} more"] if more > 0 else [])
        raise ConfigError("\n".join(shown))
    if kind is None or len(items) < 2:
        raise ConfigError(f"{p}: needs at least 2 rows (one dev, one test); found {len(items)}")
    typed: tuple[MCItem, ...] | tuple[PromptItem, ...]
    if kind == "mc":
        typed = tuple(it for it in items if isinstance(it, MCItem))
    else:
        typed = tuple(it for it in items if isinstance(it, PromptItem))
    return CustomData(p, kind, typed, hashlib.sha256(raw).hexdigest())


def describe(data: CustomData) -> dict[str, Any]:
    """What the EvalLog's config records about the file."""
    out: dict[str, Any] = {"file": str(data.path), "sha256": data.sha256, "kind": data.kind}
    out["n_items"] = len(data.items)
    if data.kind == "open":
        labels: Sequence[str] = [it.label for it in data.prompt_items]
        out["n_safe"] = sum(1 for lab in labels if lab == "safe")
        out["n_unsafe"] = len(labels) - out["n_safe"]
    return out
