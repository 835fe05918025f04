"""Load a data file and normalise its rows to Examples.

Files are read through the `datasets` library (JSONL, JSON, CSV, Parquet, `save_to_disk`
directories, or a hub name when online). The format of the rows is detected from the columns:

    alpaca             instruction / input / output   (input optional)
    sharegpt           conversations: [{from, value}]  human→user, gpt→assistant, system→system
    messages           messages: [{role, content}]     (OpenAI style)
    prompt_completion  prompt / completion
    text               text

Bad rows do not stop the load: each becomes a Problem (file, line or row, reason) and is
skipped. The caller decides whether what is left is enough (templates.prepare refuses when
nothing is).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from qlora.errors import QloraError

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text")
FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
MESSAGE_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Example:
    """One training example, before tokenization.

    Chat formats (sharegpt, messages) fill `messages`; alpaca fills instruction/input/output;
    prompt_completion fills prompt/completion; text fills text. `source` says where it came
    from ("train.jsonl:17") for error messages.
    """

    format: str
    source: str
    messages: list[dict] | None = None
    instruction: str | None = None
    input: str | None = None
    output: str | None = None
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None


@dataclass
class Problem:
    """A row that could not be used. `line` is the file line for JSONL, else the 1-based row."""

    file: str
    line: int | None
    reason: str
    unit: str = "line"

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file} {self.unit} {self.line}"
        return f"{where}: {self.reason}"


def summarize_problems(problems: list[Problem], max_listed: int = 8) -> list[str]:
    """Group problems by reason: '37 examples have an empty 'output' (lines 4, 9, 17, …) in f'."""
    groups: dict[tuple[str, str, str], list[Problem]] = {}
    for p in problems:
        groups.setdefault((p.file, p.reason, p.unit), []).append(p)
    out = []
    for (file, reason, unit), ps in groups.items():
        if len(ps) == 1:
            out.append(str(ps[0]))
            continue
        nums = [str(p.line) for p in ps if p.line is not None][:max_listed]
        more = ", …" if len(ps) > max_listed else ""
        where = f" ({unit}s {', '.join(nums)}{more})" if nums else ""
        out.append(f"{file}: {len(ps)} examples: {reason}{where}")
    return out


# ---------------------------------------------------------------------------------------------
# Reading rows


@dataclass
class _Rows:
    rows: list[dict]
    lines: list[int | None]  # where each row is in the file, for messages
    unit: str  # "line" or "row"
    problems: list[Problem] = field(default_factory=list)


def _is_local(path: str) -> bool:
    return os.path.exists(os.path.expanduser(path))


def _looks_like_path(path: str) -> bool:
    p = Path(path)
    return (p.suffix.lower() in FILE_TYPES or path.startswith((".", "/", "~"))
            or os.sep in path.strip(os.sep) and path.count(os.sep) > 1)


def _online(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _datasets_load(kind: str, path: str, **kwargs):
    """datasets.load_dataset on one local file, kept in memory; its Arrow cache goes to a temp
    dir that is removed, so loading a file leaves nothing behind in the user's HF cache."""
    import datasets
    import datasets.utils as ds_tqdm

    quiet_before = ds_tqdm.are_progress_bars_disabled()
    ds_tqdm.disable_progress_bars()  # one local file: its "Generating train split" bar is noise
    with tempfile.TemporaryDirectory(prefix="qlora-data-") as tmp:
        try:
            return datasets.load_dataset(kind, data_files=path, split="train", keep_in_memory=True,
                                         cache_dir=tmp, **kwargs)
        except Exception as e:  # noqa: BLE001 - any reader failure is bad user data here
            raise QloraError(f"{path}: could not be read as {kind}: {type(e).__name__}: {e}") from e
        finally:
            if not quiet_before:
                ds_tqdm.enable_progress_bars()


def _scan_jsonl(path: str, text: str) -> tuple[list[int], list[Problem], list[str]]:
    """Parse every line with json.loads: datasets' own error does not say which line is bad."""
    good_lines, problems, good_text = [], [], []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(Problem(path, n, f"not valid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(obj, dict):
            problems.append(Problem(path, n, f"not a JSON object (a {type(obj).__name__})"))
            continue
        good_lines.append(n)
        good_text.append(line)
    return good_lines, problems, good_text


def read_utf8(path: str | Path, what: str = "") -> str:
    """The text of a file, or a QloraError naming the line and byte offset of the first byte
    that is not UTF-8 (datasets and pandas would say only "UnicodeDecodeError")."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise QloraError(f"{what}{path} line {line} column {col} (byte offset {e.start}): not UTF-8 "
                         f"text (byte 0x{data[e.start]:02x}); re-encode the file as UTF-8, e.g. "
                         f"iconv -f latin1 -t utf-8 FILE > FILE.utf8") from None


def _read_json(path: str) -> _Rows:
    text = read_utf8(path)
    if not text.strip():
        raise QloraError(f"{path} is empty: no examples to train on.")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as e:
        whole = None
        # A file of several JSON values is JSON lines; anything else is one broken document.
        if e.msg != "Extra data" and not path.lower().endswith(".jsonl"):
            raise QloraError(f"{path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg}).") from e
    field_name = None
    if isinstance(whole, dict):
        # {"data": [rows]} is one document; a lone object is a one-line JSONL file.
        lists = [k for k, v in whole.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        field_name = lists[0] if len(lists) == 1 and len(whole) == 1 else None
        if path.lower().endswith(".jsonl") or field_name in ("messages", "conversations"):
            field_name = None
    if isinstance(whole, list) or field_name:
        kwargs = {"field": field_name} if field_name else {}
        ds = _datasets_load("json", path, **kwargs)
        return _Rows(ds.to_list(), list(range(1, len(ds) + 1)), "row")
    good_lines, problems, good_text = _scan_jsonl(path, text)
    if not good_lines:
        return _Rows([], [], "line", problems)
    if problems:
        # datasets reads the usable lines; the bad ones are reported, not fatal.
        with tempfile.TemporaryDirectory(prefix="qlora-clean-") as tmp:
            clean = os.path.join(tmp, Path(path).stem + ".jsonl")
            Path(clean).write_text("\n".join(good_text) + "\n", encoding="utf-8")
            ds = _datasets_load("json", clean)
    else:
        ds = _datasets_load("json", path)
    if len(ds) != len(good_lines):  # never expected; line numbers would be wrong
        raise QloraError(f"{path}: read {len(ds)} rows but found {len(good_lines)} JSON lines.")
    return _Rows(ds.to_list(), good_lines, "line", problems)


def _read_csv(path: str) -> _Rows:
    import datasets

    import io

    header = next(csv.reader(io.StringIO(read_utf8(path), newline="")), None)
    if not header:
        raise QloraError(f"{path} is empty: no examples to train on.")
    # Every column as a string: '3' stays '3' (pandas would make it the integer 3).
    feats = datasets.Features({name: datasets.Value("string") for name in header})
    ds = _datasets_load("csv", path, features=feats)
    return _Rows(ds.to_list(), list(range(1, len(ds) + 1)), "row")


def _read_rows(path: str, split: str | None) -> tuple[_Rows, str]:
    """Rows of a local file/dir or hub dataset, and the name to use in messages."""
    import datasets

    local = os.path.expanduser(path)
    if os.path.isdir(local):
        try:
            ds = datasets.load_from_disk(local)
        except Exception as e:  # noqa: BLE001
            raise QloraError(f"{path} is a directory but not one written by datasets' save_to_disk "
                             f"({type(e).__name__}: {e}). Pass a .jsonl/.json/.csv/.parquet file "
                             f"or a save_to_disk directory.") from e
        ds = _pick_split(ds, split, path)
        return _Rows(ds.to_list(), list(range(1, len(ds) + 1)), "row"), path
    if os.path.isfile(local):
        if os.path.getsize(local) == 0:
            raise QloraError(f"{path} is empty: no examples to train on.")
        suffix = Path(local).suffix.lower()
        if suffix not in FILE_TYPES:
            raise QloraError(f"{path}: unknown file type {suffix!r}; use one of "
                             f"{', '.join(FILE_TYPES)} or a datasets save_to_disk directory.")
        kind = FILE_TYPES[suffix]
        if kind == "json":
            return _read_json(local), path
        if kind == "csv":
            return _read_csv(local), path
        ds = _datasets_load("parquet", local)
        return _Rows(ds.to_list(), list(range(1, len(ds) + 1)), "row"), path
    if _looks_like_path(path):
        raise QloraError(f"data file {path} not found.")
    # A hub name.
    if not _online():
        raise QloraError(f"{path!r} is not a local file or directory, and this machine is offline "
                         f"(or HF_HUB_OFFLINE is set), so it cannot be fetched from the hub. "
                         f"Pass a local path: a .jsonl/.json/.csv/.parquet file or a save_to_disk directory.")
    try:
        ds = datasets.load_dataset(path, split=split or "train")
    except Exception as e:  # noqa: BLE001
        raise QloraError(f"could not load dataset {path!r} from the hub: {type(e).__name__}: {e}. "
                         f"Pass a local file instead.") from e
    return _Rows(ds.to_list(), list(range(1, len(ds) + 1)), "row"), path


def _pick_split(ds, split: str | None, path: str):
    import datasets

    if not isinstance(ds, datasets.DatasetDict):
        return ds
    if split is None:
        split = "train" if "train" in ds else (next(iter(ds)) if len(ds) == 1 else None)
    if split not in ds:
        raise QloraError(f"{path} holds splits {', '.join(ds)}; choose one with split (got {split!r}).")
    return ds[split]


def fingerprint(path: str, split: str | None = None) -> str:
    """A hash of the path and the bytes of a local file (or of every file of a directory), for
    caches. The path is part of it because cached reports name the file."""
    h = hashlib.sha256(os.path.abspath(os.path.expanduser(path)).encode())
    local = Path(os.path.expanduser(path))
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file())
    elif local.is_file():
        files = [local]
    else:  # a hub name: keyed by its name only (datasets keeps its own download cache)
        files = []
    for p in files:
        h.update(str(p.relative_to(local) if local.is_dir() else p.name).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    h.update(repr(split).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Format detection and normalisation


def _conversation_keys(rows: list[dict], column: str) -> set[str]:
    keys: set[str] = set()
    for row in rows[:100]:
        turns = row.get(column)
        if isinstance(turns, list):
            for t in turns:
                if isinstance(t, dict):
                    keys |= {k for k, v in t.items() if v is not None}
    return keys


def detect_format(columns: list[str], rows: list[dict], path: str = "data") -> str:
    """The format of these rows, from their column names (and, for chat, the turns' keys)."""
    cols = set(columns)
    for col in ("messages", "conversations"):
        if col in cols:
            keys = _conversation_keys(rows, col)
            if {"from", "value"} <= keys:
                return "sharegpt"
            if {"role", "content"} <= keys:
                return "messages"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "text" in cols:
        return "text"
    raise QloraError(
        f"{path}: cannot tell the data format from the columns {sorted(cols)}. Accepted: "
        "alpaca (instruction, input, output), sharegpt (conversations: [{from, value}]), "
        "messages (messages: [{role, content}]), prompt_completion (prompt, completion), "
        "text (text). Rename the columns (qlora train also takes the format by name: "
        "--data_format).")


# preference data's columns (data/preference.py reads them), and a KTO label's words
LAYOUTS = {"pairs": ("prompt", "chosen", "rejected"), "unpaired": ("prompt", "completion", "label")}
LABEL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def preference_label(value) -> bool | None:
    """A KTO label as data/preference reads it: a bool, 0 or 1, or one of LABEL_WORDS (any case,
    spaces around); None for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        return LABEL_WORDS.get(value.strip().lower())
    return None


# what plain fine-tuning would make of each layout
PREFERENCE_ROWS = {
    "pairs": (
        "preference pairs, which plain fine-tuning (--method sft, the default) cannot read: "
        "train on them with --method dpo (or orpo, simpo; kto reads prompt, completion, label "
        "rows). To fine-tune on one answer instead, rename its columns to a format and name it "
        "with --data_format."),
    "unpaired": (
        "unpaired preferences (label false marks an answer to avoid), which plain fine-tuning "
        "(--method sft, the default) would train on as good answers: train on them with --method "
        "kto. To fine-tune on every completion regardless of its label, pass --data_format "
        "prompt_completion."),
}


def refuse_preference_rows(cols: set[str], rows: list[dict], path: str) -> None:
    """Preference data given to supervised training (--method left at sft): pairs would be
    refused with advice that drops the comparison they are for, and KTO's rows (labels KTO reads:
    preference_label) read as prompt_completion, training on every undesirable answer. Said
    before any work, naming the method that reads them. Only training asks (load_examples'
    `refuse_preferences`): eval, the export check and the importance matrix read such files'
    prompts and completions as they are."""
    for layout, what in PREFERENCE_ROWS.items():
        columns = LAYOUTS[layout]
        if layout == "pairs" and "prompt" not in cols:
            columns = columns[1:]  # the prompt inside them (preference.shared_start)
        if set(columns) <= cols and (layout == "pairs" or _labels_are_kto_labels(rows)):
            raise QloraError(f"{path}: the columns {', '.join(columns)} are {what}")


def _labels_are_kto_labels(rows: list[dict]) -> bool:
    """The label column is KTO's (every label of the first rows one KTO reads) rather than a
    class label of supervised data."""
    labels = [row["label"] for row in rows[:100] if row.get("label") is not None]
    return bool(labels) and all(preference_label(v) is not None for v in labels)


def _as_text(value) -> str | None:
    """A field as a string; numbers become their text, None/NaN stay None."""
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        return value
    raise ValueError(f"a {type(value).__name__}, not text")


def _field(row: dict, name: str, required: bool = True, allow_empty: bool = False) -> str:
    """row[name] as text. Raises ValueError(reason) for a missing/empty/non-text field."""
    try:
        v = _as_text(row.get(name))
    except ValueError as e:
        raise ValueError(f"'{name}' is {e}") from None
    if v is None:
        if required:
            raise ValueError(f"missing '{name}'")
        return ""
    if not allow_empty and required and not v.strip():
        raise ValueError(f"empty '{name}'")
    return v


def _turns(row: dict, fmt: str) -> list[dict]:
    if fmt == "sharegpt":
        col = "conversations" if row.get("conversations") is not None else "messages"
        role_key, content_key = "from", "value"
    else:
        col = "messages" if row.get("messages") is not None else "conversations"
        role_key, content_key = "role", "content"
    turns = row.get(col)
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"missing or empty '{col}'")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise ValueError(f"turn {i} of '{col}' is not an object")
        role = t.get(role_key)
        if fmt == "sharegpt":
            if role not in SHAREGPT_ROLES:
                raise ValueError(f"turn {i} has unknown '{role_key}' {role!r} "
                                 f"(expected one of {', '.join(SHAREGPT_ROLES)})")
            role = SHAREGPT_ROLES[role]
        elif role not in MESSAGE_ROLES:
            raise ValueError(f"turn {i} has unknown '{role_key}' {role!r} "
                             f"(expected one of {', '.join(MESSAGE_ROLES)})")
        try:
            content = _as_text(t.get(content_key))
        except ValueError as e:
            raise ValueError(f"turn {i} '{content_key}' is {e}") from None
        if content is None:
            raise ValueError(f"turn {i} has no '{content_key}'")
        if role == "assistant" and not content.strip():
            raise ValueError("empty assistant response")
        out.append({"role": role, "content": content})
    if not any(t["role"] == "assistant" for t in out):
        raise ValueError("no assistant turn")
    return out


def normalize_row(row: dict, fmt: str, source: str) -> Example:
    """One row → Example, or ValueError(reason) saying what is wrong with it."""
    if fmt == "alpaca":
        return Example(fmt, source, instruction=_field(row, "instruction"),
                       input=_field(row, "input", required=False), output=_field(row, "output"))
    if fmt == "prompt_completion":
        return Example(fmt, source, prompt=_field(row, "prompt"), completion=_field(row, "completion"))
    if fmt == "text":
        return Example(fmt, source, text=_field(row, "text"))
    if fmt in ("sharegpt", "messages"):
        return Example(fmt, source, messages=_turns(row, fmt))
    raise QloraError(f"unknown data format {fmt!r}; choose one of auto, {', '.join(FORMATS)}.")


def load_examples(path: str, fmt: str = "auto", split: str | None = None,
                  refuse_preferences: bool = False) -> tuple[list[Example], list[Problem]]:
    """Read `path` and return its usable Examples and the Problems of the rows that are not.
    `refuse_preferences`: supervised training reads it, so preference rows in a file of
    undeclared format are refused (refuse_preference_rows)."""
    if fmt != "auto" and fmt not in FORMATS:
        raise QloraError(f"unknown data format {fmt!r}; choose one of auto, {', '.join(FORMATS)}.")
    data, name = _read_rows(path, split)
    problems = list(data.problems)
    if not data.rows:
        if problems:
            return [], problems
        raise QloraError(f"{name} holds no rows: no examples to train on.")
    columns = sorted({k for row in data.rows for k in row})
    if fmt == "auto":
        if refuse_preferences:
            refuse_preference_rows(set(columns), data.rows, name)
        fmt = detect_format(columns, data.rows, name)
    examples = []
    for row, line in zip(data.rows, data.lines):
        source = f"{name}:{line}" if data.unit == "line" else f"{name} row {line}"
        try:
            examples.append(normalize_row(row, fmt, source))
        except ValueError as e:
            problems.append(Problem(name, line, str(e), data.unit))
    problems.sort(key=lambda p: (p.line is None, p.line or 0))
    return examples, problems
