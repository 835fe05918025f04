"""Examples → token ids and labels, and `prepare`, which does a whole file (cached).

Which tokens carry loss (`train_on="responses"`, the default):
  chat (sharegpt, messages)  every assistant turn, including the template's end-of-turn token;
  alpaca                     the output, after the seeds' alpaca prompt, plus EOS;
  prompt_completion          the completion, plus EOS;
  text                       everything, plus EOS (there is no prompt to leave out).
`train_on="all"` puts loss on every token. The first token of every example never carries loss:
in a packed row it is the seam with the previous example (see ARCHITECTURE.md).

Finding the assistant tokens of a chat. Chat templates render a whole conversation to one
string, so we find the assistant turns as character spans of that string and map them to
tokens through the tokenizer's offsets:
  1. a template with `{% generation %}` blocks says where they are itself
     (`apply_chat_template(..., return_assistant_tokens_mask=True)`);
  2. for any other template we render the conversation prefix by prefix: the turn i span starts
     where `render(messages[:i], add_generation_prompt=True)` ends and ends where
     `render(messages[:i+1])` ends (trailing whitespace after the end-of-turn token dropped).
     Templates that render earlier turns differently once later ones exist (so a prefix is not
     a prefix of the whole) fall back to finding the turn's content in the rendered text and
     extending it over the special token that follows (the end-of-turn marker).
Working on characters rather than on token counts of prefixes means a BPE merge across a
prefix boundary cannot shift the labels.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qlora.data.formats import Example, Problem, fingerprint, load_examples, summarize_problems
from qlora.errors import QloraError
from qlora.models.decoder import IGNORE_INDEX as IGNORE  # the label of a position without loss

CACHE_VERSION = 1  # bump when the encoding changes, so old caches are not reused

# The seeds' alpaca prompts (qlora-notebook.txt), character for character.
ALPACA_PROMPT_WITH_INPUT = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

### Instruction:
{instruction}

### Input:
{input}

### Response:
{output}"""

ALPACA_PROMPT_WITHOUT_INPUT = """Below is an instruction that describes a task. Write a response that appropriately completes the request.

### Instruction:
{instruction}

### Response:
{output}"""

# Named fallback for models whose tokenizer has no chat template (`chat_template: chatml`).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML_TEMPLATE}
CHAT_FORMATS = ("sharegpt", "messages")


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """The seeds' alpaca prompt without the output (ends with '### Response:\\n')."""
    if input is not None and input.strip():
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input, output="")
    return ALPACA_PROMPT_WITHOUT_INPUT.format(instruction=instruction, output="")


def template_from_option(chat_template: str) -> str:
    """The Jinja template the chat_template option names: a name, a .jinja file or the template
    itself. `qlora train` checks it when it reads its options, whether the data is chat or not."""
    if chat_template in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[chat_template]
    if chat_template.endswith(".jinja"):
        p = Path(os.path.expanduser(chat_template))
        if not p.is_file():
            raise QloraError(f"chat_template file {chat_template} not found; give an existing "
                             f".jinja file, a name ({', '.join(NAMED_TEMPLATES)}) or a Jinja template.")
        return p.read_text(encoding="utf-8")
    if "{%" in chat_template or "{{" in chat_template:
        return chat_template
    raise QloraError(f"chat_template {chat_template!r} is not a known name "
                     f"({', '.join(NAMED_TEMPLATES)}), a .jinja file or a Jinja template.")


def resolve_chat_template(tokenizer, chat_template: str | None = None) -> str:
    """The Jinja template to use: the option's (`template_from_option`), else the tokenizer's
    own."""
    if chat_template is not None:
        return template_from_option(chat_template)
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default") or next(iter(own.values()), None)
    if not own:
        where = getattr(tokenizer, "name_or_path", "") or "the model directory"
        raise QloraError(
            f"the tokenizer of {where} has no chat template (no 'chat_template' in its "
            f"tokenizer_config.json or chat_template.jinja), so chat data (sharegpt / messages) "
            f"cannot be rendered. Set `chat_template: chatml` (option --chat_template chatml) to use "
            f"the ChatML template, or give the data in the alpaca format (instruction/input/output).")
    return own


def _render(tokenizer, messages, template, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _tokens_with_offsets(tokenizer, text: str, add_special_tokens: bool):
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _mask_from_spans(offsets, spans, ids, special_ids) -> list[bool]:
    """Token j is in a span when it starts inside it. Special tokens added by the tokenizer
    itself (BOS) have empty offsets and are never in a span."""
    mask = [False] * len(offsets)
    for j, (s, e) in enumerate(offsets):
        if e == s and ids[j] in special_ids:
            continue
        mask[j] = any(a <= s < b for a, b in spans)
    return mask


def _assistant_spans(tokenizer, messages, template, text, ids, offsets) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in `text` (the rendered conversation)."""
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            before = _render(tokenizer, messages[:i], template, add_generation_prompt=True) if i else ""
        except Exception:  # noqa: BLE001 - some templates refuse an empty or odd prefix
            before = None
        upto = _render(tokenizer, messages[: i + 1], template)
        if before is not None and text.startswith(upto) and upto.startswith(before) \
                and len(before) >= cursor:
            start, end = len(before), len(upto)
            end = start + len(text[start:end].rstrip())
        else:
            start = text.find(m["content"], cursor)
            if start < 0:
                raise QloraError("the chat template does not render the assistant's words as they are "
                                 "given; set `chat_template: chatml` or use a template with "
                                 "{% generation %} markers.")
            end = start + len(m["content"])
            # The end-of-turn marker right after the content is part of what the model must say.
            nxt = next((j for j, (s, _) in enumerate(offsets) if s >= end), None)
            if nxt is not None and offsets[nxt][0] == end and _is_special(tokenizer, ids[nxt]):
                end = offsets[nxt][1]
        spans.append((start, end))
        cursor = end
    return spans


def _is_special(tokenizer, token_id: int) -> bool:
    if token_id in tokenizer.all_special_ids:
        return True
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tok = added.get(token_id)
    return bool(tok is not None and getattr(tok, "special", False))


def _encode_chat(messages, tokenizer, train_on, template) -> tuple[list[int], list[bool]]:
    if "generation" in template and "endgeneration" in template:
        out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True,
                                            return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), [bool(x) for x in out["assistant_masks"]]
        if any(mask) or train_on == "all":
            return ids, mask
    text = _render(tokenizer, messages, template)
    ids, offsets = _tokens_with_offsets(tokenizer, text, add_special_tokens=False)
    if train_on == "all":
        return ids, [True] * len(ids)
    spans = _assistant_spans(tokenizer, messages, template, text, ids, offsets)
    return ids, _mask_from_spans(offsets, spans, ids, set(tokenizer.all_special_ids))


def _encode_prompt_response(prompt: str, response: str, tokenizer) -> tuple[list[int], list[bool]]:
    """prompt + response tokenized as one text (as the seeds do), the response span labelled,
    EOS appended (labelled) so the model learns to stop."""
    text = prompt + response
    ids, offsets = _tokens_with_offsets(tokenizer, text, add_special_tokens=True)
    mask = _mask_from_spans(offsets, [(len(prompt), len(text))], ids, set(tokenizer.all_special_ids))
    return _with_eos(ids, mask, tokenizer)


def _with_eos(ids, mask, tokenizer):
    eos = tokenizer.eos_token_id
    if eos is None:
        return ids, mask
    if ids and ids[-1] == eos:  # the tokenizer adds one itself
        mask[-1] = True
        return ids, mask
    return ids + [eos], mask + [True]


def encode_example(example: Example, tokenizer, train_on: str = "responses",
                   chat_template: str | None = None) -> dict[str, list[int]]:
    """{"input_ids", "labels"} of one example; labels are -100 where there is no loss."""
    if train_on not in ("responses", "all"):
        raise QloraError(f"train_on must be 'responses' or 'all', not {train_on!r}.")
    if example.format in CHAT_FORMATS:
        template = resolve_chat_template(tokenizer, chat_template)
        ids, mask = _encode_chat(example.messages, tokenizer, train_on, template)
    elif example.format == "alpaca":
        ids, mask = _encode_prompt_response(alpaca_prompt(example.instruction, example.input),
                                            example.output, tokenizer)
    elif example.format == "prompt_completion":
        ids, mask = _encode_prompt_response(example.prompt, example.completion, tokenizer)
    elif example.format == "text":
        ids = list(tokenizer(example.text, add_special_tokens=True)["input_ids"])
        ids, mask = _with_eos(ids, [True] * len(ids), tokenizer)
    else:
        raise QloraError(f"unknown example format {example.format!r}.")
    if train_on == "all":
        mask = [True] * len(ids)
    labels = [t if m else IGNORE for t, m in zip(ids, mask)]
    if labels:
        labels[0] = IGNORE  # the seam of a packed row: no loss on an example's first token
    return {"input_ids": ids, "labels": labels}


def encode_prompt(example: Example, tokenizer, chat_template: str | None = None
                  ) -> tuple[list[int], str]:
    """The prompt tokens a model should continue, and the reference answer, for generation
    and exact-match evaluation (chat: everything before the last assistant turn)."""
    if example.format in CHAT_FORMATS:
        template = resolve_chat_template(tokenizer, chat_template)
        last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
        text = _render(tokenizer, example.messages[:last], template, add_generation_prompt=True)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids, example.messages[last]["content"]
    if example.format == "alpaca":
        prompt, ref = alpaca_prompt(example.instruction, example.input), example.output
    elif example.format == "prompt_completion":
        prompt, ref = example.prompt, example.completion
    else:
        raise QloraError(f"{example.source}: {example.format} examples have no prompt/response split "
                         f"to generate from; use alpaca, prompt_completion or chat data.")
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"]), ref


# ---------------------------------------------------------------------------------------------
# A whole file: load, encode, length limit, cache


@dataclass
class PrepareReport:
    path: str
    format: str = ""
    n_rows: int = 0  # rows read (usable or not)
    n_examples: int = 0  # encoded examples returned
    n_truncated: int = 0
    n_dropped: int = 0  # dropped for length (or no response left within max_len)
    n_tokens: int = 0
    n_label_tokens: int = 0
    max_len: int = 0
    problems: list[Problem] = field(default_factory=list)  # everything skipped or cut, with where
    cache_hit: bool = False
    cache_file: str | None = None

    def lines(self) -> list[str]:
        """What to print before training."""
        left_out = self.n_rows - self.n_examples
        out = [f"{self.path}: {self.n_examples} examples ({self.format}) from {self.n_rows} rows"
               + (f" ({left_out} left out, listed below)" if left_out else "")
               + f", {self.n_tokens} tokens, {self.n_label_tokens} with loss"
               + (" [cached]" if self.cache_hit else "")]
        return out + summarize_problems(self.problems)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "PrepareReport":
        d = dict(d)
        d["problems"] = [Problem(**p) for p in d["problems"]]
        return cls(**d)


def tokenizer_fingerprint(tokenizer, chat_template: str | None) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None
             else json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([type(tokenizer).__name__, str(getattr(tokenizer, "chat_template", None)),
                         chat_template, tokenizer.bos_token_id, tokenizer.eos_token_id]).encode())
    return h.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("QLORA_CACHE_DIR", Path.home() / ".cache" / "qlora")) / "data"


def _save_cache(file: Path, examples: list[dict], report: PrepareReport) -> None:
    import numpy as np

    lengths = np.array([len(e["input_ids"]) for e in examples], dtype=np.int64)
    ids = np.fromiter((t for e in examples for t in e["input_ids"]), dtype=np.int64)
    labels = np.fromiter((t for e in examples for t in e["labels"]), dtype=np.int64)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + f".tmp{os.getpid()}")
    buf = io.BytesIO()
    np.savez(buf, lengths=lengths, input_ids=ids, labels=labels,
             report=np.array(json.dumps(report.to_json())))
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, file)  # never a half-written cache


def _load_cache(file: Path) -> tuple[list[dict], PrepareReport] | None:
    import numpy as np

    try:
        with np.load(file) as z:
            lengths, ids, labels = z["lengths"], z["input_ids"].tolist(), z["labels"].tolist()
            report = PrepareReport.from_json(json.loads(str(z["report"])))
    except Exception:  # noqa: BLE001 - a damaged cache is rebuilt
        return None
    examples, pos = [], 0
    for n in lengths.tolist():
        examples.append({"input_ids": ids[pos:pos + n], "labels": labels[pos:pos + n]})
        pos += n
    return examples, report


def _limit_length(enc: dict, max_len: int, overlong: str, where: tuple, report) -> dict | None:
    """enc cut to max_len tokens, or None when dropped; `where` is (file, line, unit)."""
    file, line, unit = where
    n = len(enc["input_ids"])
    if n <= max_len:
        return enc
    if overlong == "drop":
        report.n_dropped += 1
        report.problems.append(Problem(file, line, f"longer than max_len={max_len} tokens, dropped", unit))
        return None
    cut = {"input_ids": enc["input_ids"][:max_len], "labels": enc["labels"][:max_len]}
    if all(t == IGNORE for t in cut["labels"]):
        report.n_dropped += 1
        report.problems.append(Problem(file, line, f"no response within max_len={max_len} tokens "
                                                   f"(the prompt alone is longer), dropped", unit))
        return None
    report.n_truncated += 1
    report.problems.append(Problem(file, line, f"longer than max_len={max_len} tokens, truncated", unit))
    return cut


def _where(example: Example) -> tuple:
    """Problem(file, line, ..., unit) fields from an example's source string."""
    src = example.source
    if " row " in src:
        file, num = src.rsplit(" row ", 1)
        return file, int(num), "row"
    file, _, num = src.rpartition(":")
    return (file, int(num), "line") if num.isdigit() else (src, None, "line")


def prepare(path: str, tokenizer, *, fmt: str = "auto", train_on: str = "responses",
            max_len: int = 2048, overlong: str = "truncate", chat_template: str | None = None,
            cache_dir: str | None = None, cache: bool = True, split: str | None = None,
            refuse_preferences: bool = False) -> tuple[list[dict], PrepareReport]:
    """Load, encode and length-limit every example of `path`. Refuses (QloraError) when no
    usable example remains, and preference rows where `refuse_preferences` (load_examples').
    Encoded examples are cached in cache_dir (default ~/.cache/qlora/data, or
    $QLORA_CACHE_DIR/data) under a hash of the file's bytes, the tokenizer and these options, so
    a second run does not tokenize again."""
    if train_on not in ("responses", "all"):
        raise QloraError(f"train_on must be 'responses' or 'all', not {train_on!r}.")
    if overlong not in ("truncate", "drop"):
        raise QloraError(f"overlong must be 'truncate' or 'drop', not {overlong!r}.")
    if not isinstance(max_len, int) or max_len < 2:
        raise QloraError(f"max_len must be an integer of at least 2, not {max_len!r}.")
    cache_file = None
    if cache:
        key = hashlib.sha256(json.dumps([CACHE_VERSION, fingerprint(path, split),
                                         tokenizer_fingerprint(tokenizer, chat_template),
                                         fmt, train_on, max_len, overlong,
                                         # a file another command cached must still be refused
                                         refuse_preferences]).encode()).hexdigest()
        cache_file = Path(cache_dir or default_cache_dir()) / f"tokenized-{key[:32]}.npz"
        if cache_file.is_file():
            hit = _load_cache(cache_file)
            if hit is not None:
                examples, report = hit
                report.cache_hit, report.cache_file = True, str(cache_file)
                return examples, report

    from jinja2 import TemplateError

    examples, problems = load_examples(path, fmt, split, refuse_preferences)
    report = PrepareReport(path=path, n_rows=len(examples) + len(problems), max_len=max_len,
                           problems=list(problems))
    report.format = examples[0].format if examples else fmt
    if any(e.format in CHAT_FORMATS for e in examples):
        resolve_chat_template(tokenizer, chat_template)  # no template: one clear error, up front
    encoded = []
    for ex in examples:
        try:
            enc = encode_example(ex, tokenizer, train_on, chat_template)
        except QloraError as e:
            raise QloraError(f"{ex.source}: {e}") from e
        except TemplateError as e:  # a template that refuses this conversation (role order, …)
            file, line, unit = _where(ex)
            report.problems.append(Problem(file, line, f"could not be encoded: {e}", unit))
            continue
        w = _where(ex)
        enc = _limit_length(enc, max_len, overlong, w, report)
        if enc is None:
            continue
        if all(t == IGNORE for t in enc["labels"]):
            report.problems.append(Problem(w[0], w[1], "no tokens to learn from", w[2]))
            continue
        encoded.append(enc)
    report.problems.sort(key=lambda p: (p.line is None, p.line or 0))
    report.n_examples = len(encoded)
    report.n_tokens = sum(len(e["input_ids"]) for e in encoded)
    report.n_label_tokens = sum(sum(t != IGNORE for t in e["labels"]) for e in encoded)
    if not encoded:
        why = "; ".join(summarize_problems(report.problems)) or "the file has no rows"
        raise QloraError(f"{path}: no usable examples out of {report.n_rows} rows, nothing to train on. "
                         f"{why}")
    if cache_file is not None:
        _save_cache(cache_file, encoded, report)
        report.cache_file = str(cache_file)
    return encoded, report


def split_validation(examples: list, fraction: float, seed: int = 0) -> tuple[list, list]:
    """(train, validation): a seeded random `fraction` held out (at least one), order kept."""
    if not 0 < fraction < 1:
        raise QloraError(f"validation fraction must be between 0 and 1, not {fraction!r}.")
    n = len(examples)
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise QloraError(f"cannot hold out {fraction:.0%} of {n} examples for validation and keep "
                         f"some to train on; add data, lower the fraction or pass a validation file.")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [e for i, e in enumerate(examples) if i not in val_idx]
    val = [e for i, e in enumerate(examples) if i in val_idx]
    return train, val
