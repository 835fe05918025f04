"""Preference data: rows → token ids of a prompt and its completions, and the batches built of them.

Two layouts, detected from the columns as the SFT formats are (formats.py):

    pairs      prompt / chosen / rejected          DPO, ORPO, SimPO
    unpaired   prompt / completion / label (bool)  KTO: label true = desirable

Each field is a string, or a list of messages ({role, content}) rendered with the model's chat
template: the prompt with the generation prompt appended, each completion as what the template
adds after it. Loss is only ever on the completion tokens. Pairs may also come as two whole
conversations with no prompt column (or a text one beside them), or as two whole texts with no
prompt column (hh-rlhf's): what they share from the start is the prompt (shared_start, as
TRL's extract_prompt reads them).

A batch of pairs holds the chosen sequences first, then the rejected ones (TRL's concatenated
batch), so one forward serves both. A KTO batch holds each example's sequence, then its KL
sequence: the example's prompt with the completion of the example before it in the batch (TRL's
mismatched pairs, for the KL estimate). Two layouts of the same sequences:

    padded  one sequence per row, [S, T] (T the longest), padding at the end of each row
    packed  all of them end to end in one row, [1, N], N their total length: no padding at all.
            position_ids restart at 0 at each sequence, so the model keeps them apart (flash
            varlen attention on CUDA, as SFT's packed rows), and the first token of each has no
            label, so no log-prob crosses a seam

A packed batch of pairs holds each pair's prompt once (`shared_prompt_batch`): prompt, chosen
completion, rejected completion end to end, the rejected completion's positions continuing from
the prompt's end as the chosen's do. Its attention plan is made here, on the host (`attention`: the
prompt + chosen completion a document, the rejected completion a document whose keys are the
prompt's then its own: models/attention.GatheredKeys), and so are its label positions (the
rejected completion's first token is predicted from the prompt's last). At a prompt of P tokens
and completions of C and R, P + C + R tokens go through each forward instead of 2P + C + R, for
the same log-probs: every token sees exactly what it sees in its own sequence.

`label_layout` gives each label token's predicting position, its target and its sequence, whatever
the layout; a method sums its log-probs per sequence with it (methods/preference.py).

Each batch also says how much each token weighs in a mixture of experts' load-balancing loss
(`router_weights`, [rows, T] fp32), as TRL's trainers count it over their padded batch: 1 a token
of a sequence, 2 a shared prompt's token (TRL's batch holds it in both rows), 0 padding and KTO's
KL sequences (TRL takes the loss from the examples' forward only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qlora.data.formats import (LAYOUTS, MESSAGE_ROLES, Problem, _read_rows, preference_label,
                                summarize_problems)
from qlora.data.packing import make_batch
from qlora.data.templates import _render, resolve_chat_template
from qlora.errors import QloraError
from qlora.models.attention import GatheredKeys, Varlen
from qlora.models.decoder import IGNORE_INDEX as IGNORE



@dataclass
class PreferenceReport:
    path: str
    layout: str = ""
    n_rows: int = 0
    n_examples: int = 0
    n_tokens: int = 0
    chat_rows: int = 0  # examples whose fields came as messages: rendered with a chat template
    problems: list[Problem] = field(default_factory=list)

    @property
    def chat(self) -> bool:
        """Whether the prompts went through the chat template: for most of the examples (a file
        mixing both is rendered row by row; a record of how to prompt the adapter needs one)."""
        return 2 * self.chat_rows > self.n_examples

    def lines(self) -> list[str]:
        left_out = self.n_rows - self.n_examples
        return [f"{self.path}: {self.n_examples} {self.layout} preference examples from "
                f"{self.n_rows} rows" + (f" ({left_out} left out, listed below)" if left_out else "")
                + f", {self.n_tokens} tokens"] + summarize_problems(self.problems)


def detect_layout(columns: list[str], path: str, wanted: str) -> str:
    """`wanted` ("pairs" or "unpaired") when the columns have it, else an error naming what is
    missing. Pairs may leave out "prompt" where chosen and rejected are whole conversations or
    texts that begin with it (shared_start)."""
    missing = [c for c in _needed(wanted) if c not in columns]
    if not missing:
        return wanted
    other = "unpaired" if wanted == "pairs" else "pairs"
    hint = ""
    if all(c in columns for c in _needed(other)):
        hint = (f" The file holds {other} data ({', '.join(LAYOUTS[other])}): "
                + ("use --method kto." if other == "unpaired" else "use --method dpo, orpo or simpo."))
    columns_needed = ("prompt (unless chosen and rejected are whole texts or conversations), "
                      "chosen, rejected" if wanted == "pairs" else ", ".join(LAYOUTS[wanted]))
    raise QloraError(f"{path}: {wanted} preference data needs the columns {columns_needed}; "
                     f"missing {', '.join(repr(m) for m in missing)} "
                     f"(columns: {', '.join(sorted(columns))}).{hint}")


def _needed(layout: str) -> tuple[str, ...]:
    """The columns a layout cannot do without: pairs may leave their prompt inside chosen and
    rejected (shared_start)."""
    return LAYOUTS[layout][1:] if layout == "pairs" else LAYOUTS[layout]


def _text_or_messages(row: dict, name: str):
    """row[name]: a non-empty string, or a list of {role, content} messages."""
    value = row.get(name)
    if value is None:
        raise ValueError(f"missing '{name}'")
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"empty '{name}'")
        return value
    if isinstance(value, list) and value:
        for i, m in enumerate(value):
            if not isinstance(m, dict) or m.get("role") not in MESSAGE_ROLES \
                    or not isinstance(m.get("content"), str):
                raise ValueError(f"'{name}' message {i} is not a {{role, content}} message")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ValueError(f"'{name}' is neither text nor a list of messages")


def _label(row: dict) -> bool:
    value = row.get("label")
    label = preference_label(value)
    if label is None:
        raise ValueError("missing 'label'" if value is None else f"'label' is {value!r}, not a bool")
    return label


class Encoder:
    """A prompt and a completion → (prompt ids, completion ids), both ending where the other
    starts: TRL tokenizes them apart too, so the seam is the same for every completion."""

    def __init__(self, tokenizer, chat_template: str | None):
        self.tokenizer, self.chat_template = tokenizer, chat_template

    def encode(self, prompt, completion) -> tuple[list[int], list[int]]:
        if isinstance(prompt, str) and isinstance(completion, str):
            return self._plain(prompt, completion)
        return self._chat(prompt, completion)

    def _plain(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        p = list(tok(prompt, add_special_tokens=True)["input_ids"])
        c = list(tok(completion, add_special_tokens=False)["input_ids"])
        if tok.eos_token_id is not None:  # the model learns to stop after the answer
            c.append(tok.eos_token_id)
        return p, c

    def _chat(self, prompt, completion) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        template = resolve_chat_template(tok, self.chat_template)
        prompt = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        completion = completion if isinstance(completion, list) \
            else [{"role": "assistant", "content": completion}]
        head = _render(tok, prompt, template, add_generation_prompt=True)
        whole = _render(tok, prompt + completion, template)
        if not whole.startswith(head):
            raise ValueError("the chat template does not render the prompt as the start of the "
                             "conversation; set `chat_template: chatml`")
        # the end-of-turn marker is the completion's; the whitespace after it is not
        tail = whole[len(head):].rstrip()
        return (list(tok(head, add_special_tokens=False)["input_ids"]),
                list(tok(tail, add_special_tokens=False)["input_ids"]))


def _fit(prompt: list[int], completions: list[list[int]], max_len: int
         ) -> tuple[list[int], list[list[int]]]:
    """The prompt cut from the left (its end is nearest the answer), then the completions at their
    end, until every prompt + completion is at most max_len tokens."""
    longest = max(len(c) for c in completions)
    keep = max(max_len - longest, max_len // 2)
    prompt = prompt[max(len(prompt) - keep, 0):]  # (not prompt[-keep:]: at keep 0, all of it)
    return prompt, [c[:max_len - len(prompt)] for c in completions]


def load_preference(path: str, tokenizer, *, layout: str, max_len: int,
                    overlong: str = "truncate", chat_template: str | None = None
                    ) -> tuple[list[dict], PreferenceReport]:
    """Encoded preference examples of `path`: {"prompt", "chosen", "rejected"} (pairs) or
    {"prompt", "completion", "label"} (unpaired) token ids. A bad row is a Problem naming its line
    and field, and is skipped; no usable row at all is an error that lists them."""
    data, name = _read_rows(path, None)
    report = PreferenceReport(path=path, layout=layout, problems=list(data.problems))
    columns = sorted({k for row in data.rows for k in row})
    if data.rows:
        detect_layout(columns, name, layout)
    encoder = Encoder(tokenizer, chat_template)
    examples = []
    for row, line in zip(data.rows, data.lines):
        try:
            example = _encode_row(row, layout, encoder)
        except ValueError as e:
            report.problems.append(Problem(name, line, str(e), data.unit))
            continue
        example = _limit(example, layout, max_len, overlong)
        if example is None:
            report.problems.append(Problem(name, line, f"longer than max_len={max_len} tokens, "
                                                       "dropped", data.unit))
            continue
        examples.append(example)
        report.chat_rows += any(isinstance(row.get(k), list) for k in LAYOUTS[layout])
    report.n_rows = len(data.rows) + len(data.problems)
    report.n_examples = len(examples)
    report.n_tokens = sum(len(s) for e in examples for k, s in e.items() if k != "label")
    if not examples:
        why = "; ".join(summarize_problems(report.problems)) or "the file has no rows"
        raise QloraError(f"{path}: no usable preference examples out of {report.n_rows} rows. "
                         f"{why}")
    return examples, report


def shared_start(chosen, rejected):
    """(prompt, chosen, rejected) of a pair given whole, as two conversations (lists of messages)
    or two texts (hh-rlhf's "Human: ... Assistant: ..."): what they share from the start is the
    prompt, the rest each one's completion, as TRL's extract_prompt splits them (its DPOTrainer
    reads such rows so). Where one is the other's start, the last shared message or character
    stays with the completions, so that each keeps one; a space two texts share just before
    they differ stays with the completions too. None where they share no first one."""
    shorter = min(len(chosen), len(rejected))
    shared = next((i for i in range(shorter) if chosen[i] != rejected[i]), shorter)
    if shared == shorter:
        shared -= 1
    elif shared and isinstance(chosen, str) and chosen[shared - 1] == " ":
        shared -= 1
    return None if shared <= 0 else (chosen[:shared], chosen[shared:], rejected[shared:])


def _encode_row(row: dict, layout: str, encoder: Encoder) -> dict:
    if layout == "pairs":
        chosen, rejected = _text_or_messages(row, "chosen"), _text_or_messages(row, "rejected")
        prompt = row.get("prompt")
        # whole conversations (a text prompt beside them repeats their first message, as in
        # UltraFeedback's binarized rows: TRL's maybe_extract_prompt reads both so), or whole
        # texts without a prompt (hh-rlhf's)
        conversations = isinstance(chosen, list) and isinstance(rejected, list)
        texts = isinstance(chosen, str) and isinstance(rejected, str)
        whole = (conversations and not isinstance(prompt, list)) or (texts and prompt is None)
        split = shared_start(chosen, rejected) if whole else None
        if split is not None:
            prompt, chosen, rejected = split
            if isinstance(prompt, list) and prompt[-1]["role"] not in ("user", "tool"):
                raise ValueError(f"'chosen' and 'rejected' first differ after message "
                                 f"{len(prompt)} ({prompt[-1]['role']}): the history they share, "
                                 "the prompt, must end with a user message; give the prompt in a "
                                 "'prompt' column")
        elif prompt is None:
            raise ValueError("missing 'prompt' (without one, chosen and rejected must be whole "
                             "texts or conversations that begin alike: what they share from the "
                             "start is the prompt)")
        else:
            prompt = _text_or_messages(row, "prompt")
        p, c = encoder.encode(prompt, chosen)
        _, r = encoder.encode(prompt, rejected)
        return {"prompt": p, "chosen": c, "rejected": r}
    prompt = _text_or_messages(row, "prompt")
    completion, label = _text_or_messages(row, "completion"), _label(row)
    p, c = encoder.encode(prompt, completion)
    return {"prompt": p, "completion": c, "label": label}


def _limit(example: dict, layout: str, max_len: int, overlong: str) -> dict | None:
    names = ["chosen", "rejected"] if layout == "pairs" else ["completion"]
    if max(len(example["prompt"]) + len(example[n]) for n in names) <= max_len:
        return example
    if overlong == "drop":
        return None
    prompt, completions = _fit(example["prompt"], [example[n] for n in names], max_len)
    return {**example, "prompt": prompt, **dict(zip(names, completions))}


# --- batches --------------------------------------------------------------------------------------
def _sequence(prompt: list[int], completion: list[int]) -> dict:
    """One sequence: the prompt without loss, the completion with."""
    return {"input_ids": prompt + completion, "labels": [IGNORE] * len(prompt) + completion}


def sequences_batch(sequences: list[dict], pad_id: int, packed: bool) -> dict:
    """input_ids, labels, position_ids and sequence_ids of `sequences`, padded ([S, T]) or packed
    ([1, N]); `n_sequences` = S."""
    rows = [sequences] if packed else [[s] for s in sequences]
    batch = make_batch(rows, pad_id)
    ids = torch.full(batch["input_ids"].shape, -1, dtype=torch.long)
    start = 0
    for k, s in enumerate(sequences):
        n = len(s["input_ids"])
        if packed:
            ids[0, start:start + n] = k
            start += n
        else:
            ids[k, :n] = k
    batch["sequence_ids"], batch["n_sequences"] = ids, len(sequences)
    batch["router_weights"] = (ids >= 0).float()
    return batch


def pair_batch(examples: list[dict], pad_id: int, packed: bool = False,
               share_prompt: bool = True) -> dict:
    """The B chosen sequences, then the B rejected ones (sequence k < B: example k's chosen);
    packed, each prompt once (shared_prompt_batch) unless `share_prompt` is off."""
    if packed and share_prompt:
        batch = shared_prompt_batch(examples)
    else:
        batch = sequences_batch([_sequence(e["prompt"], e["chosen"]) for e in examples]
                                + [_sequence(e["prompt"], e["rejected"]) for e in examples],
                                pad_id, packed)
        batch["n_tokens"] = sum(example_tokens(e) for e in examples)
    batch["n_examples"] = len(examples)
    if all("ref_chosen" in e for e in examples):  # precomputed (precompute_ref_log_probs)
        batch["ref_logps"] = torch.tensor([e["ref_chosen"] for e in examples]
                                          + [e["ref_rejected"] for e in examples],
                                          dtype=torch.float32)
    return batch


def shared_prompt_batch(examples: list[dict]) -> dict:
    """The pairs packed in one row [1, N], each as its prompt, chosen and rejected completions
    (N = the sum of P + C + R), with what the model needs to see them as 2B sequences:

        position_ids     the prompt 0..P-1, each completion P.. on from it
        attention        a Varlen plan on the host: per pair, queries prompt + chosen over those
                         keys, then queries rejected over the keys prompt + rejected
        label_positions  (rows, ts): the position predicting each completion token (a rejected
                         completion's first: the prompt's last), with label_targets and
                         label_sequences (chosen k, rejected B + k), label_layout's order
        labels           each completion token's own id at its position, -100 elsewhere: the
                         staging's row buffer only, NOT labels the model shifts (a rejected
                         completion's first token does not follow the token before it), so
                         label_layout, never labels, says what predicts what
        sequence_ids     the sequence of each token (a prompt's: its chosen one's)

    Every completion token sees its own prompt and the tokens before it in its own completion,
    as in its own sequence: the log-probs are those of pair_batch's other layouts."""
    B, long = len(examples), torch.long
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in (
        "ids", "pos", "seq", "labels", "predictors", "targets", "label_seq", "keys", "reads")}
    cu_q, cu_k, start = [0], [0], 0
    for k, e in enumerate(examples):  # a few tensor ops a pair, none a token: host time is staged
        p, c, r = (torch.tensor(e[name], dtype=long) for name in ("prompt", "chosen", "rejected"))
        P, C, R = p.numel(), c.numel(), r.numel()
        prompt, chosen = torch.arange(start, start + P), torch.arange(start + P, start + P + C)
        rejected = torch.arange(start + P + C, start + P + C + R)
        parts["ids"] += [p, c, r]
        parts["pos"] += [torch.arange(P + C), torch.arange(P, P + R)]
        parts["seq"] += [torch.full((P + C,), k), torch.full((R,), B + k)]
        parts["labels"] += [torch.full((P,), IGNORE), c, r]
        parts["reads"] += [torch.full((P,), 2), torch.ones(C + R, dtype=long)]  # rows reading it
        # each completion token is predicted by the token before it in its own sequence: the
        # first by the prompt's last (none without a prompt: that token has no label)
        for sequence, tokens, positions in ((k, c, chosen), (B + k, r, rejected)):
            before = (torch.cat([prompt[-1:], positions[:-1]]) if P else positions[:-1])
            before = before[:tokens.numel()]  # an empty completion: no label, no predictor
            parts["predictors"].append(before)
            parts["targets"].append(tokens if P else tokens[1:])
            parts["label_seq"].append(torch.full((before.numel(),), sequence))
        parts["keys"] += [prompt, chosen, prompt, rejected]
        cu_q += [cu_q[-1] + P + C, cu_q[-1] + P + C + R]
        cu_k += [cu_k[-1] + P + C, cu_k[-1] + P + C + P + R]
        start += P + C + R
    flat = {name: torch.cat(t).to(long) if t else torch.zeros(0, dtype=long)
            for name, t in parts.items()}
    lengths_q = [b - a for a, b in zip(cu_q, cu_q[1:])]
    lengths_k = [b - a for a, b in zip(cu_k, cu_k[1:])]
    keys = GatheredKeys(flat["keys"], torch.tensor(cu_k, dtype=torch.int32),
                        max(lengths_k, default=0))
    return {"input_ids": flat["ids"][None], "position_ids": flat["pos"][None],
            "labels": flat["labels"][None], "sequence_ids": flat["seq"][None],
            "real_lengths": torch.tensor([start]), "n_sequences": 2 * B, "n_tokens": start,
            "router_weights": flat["reads"][None].float(),
            "attention": Varlen(torch.tensor(cu_q, dtype=torch.int32), max(lengths_q, default=0),
                                keys=keys),
            "label_positions": (torch.zeros(flat["predictors"].numel(), dtype=long),
                                flat["predictors"]),
            "label_targets": flat["targets"], "label_sequences": flat["label_seq"]}


def label_layout(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, ts, targets, sequences) of a batch's label tokens: position ts of row `rows`
    predicts `targets`, a token of sequence `sequences`; row-major over the predicting positions
    where the labels say it by position (the model predicts labels[t + 1] at t), else as
    shared_prompt_batch laid them out."""
    if "label_positions" in batch:
        rows, ts = batch["label_positions"]
        return rows, ts, batch["label_targets"], batch["label_sequences"]
    labels = batch["labels"]
    rows, ts = torch.nonzero(labels[:, 1:] != IGNORE, as_tuple=True)
    return rows, ts, labels[rows, ts + 1], batch["sequence_ids"][rows, ts + 1]


def unpaired_batch(examples: list[dict], pad_id: int, packed: bool = False) -> dict:
    """The B examples' sequences, then their B KL sequences (prompt i with the completion of
    example i - 1, cyclically, as TRL pairs them), and `label` [B]."""
    completions = [e["completion"] for e in examples]
    shifted = completions[-1:] + completions[:-1]
    batch = sequences_batch([_sequence(e["prompt"], c) for e, c in zip(examples, completions)]
                            + [_sequence(e["prompt"], c) for e, c in zip(examples, shifted)],
                            pad_id, packed)
    batch["n_examples"] = len(examples)
    batch["n_tokens"] = sum(example_tokens(e) for e in examples)
    batch["label"] = torch.tensor([e["label"] for e in examples], dtype=torch.bool)
    batch["router_weights"][batch["sequence_ids"] >= len(examples)] = 0  # the KL sequences
    return batch


def half(batch: dict, second: bool) -> dict:
    """The sub-batch of the first or the second half of a batch's sequences (KTO: its examples,
    or their KL sequences), renumbered from 0: rows of a padded batch, the tokens up to or from
    the seam of a packed one (each half is then a packed row of its own)."""
    n = batch["n_sequences"] // 2
    ids = batch["sequence_ids"]
    if ids.shape[0] > 1:  # padded: a row per sequence
        take = (slice(n, None) if second else slice(0, n), slice(None))
    else:
        seam = int((ids[0] < n).sum())  # the first half's tokens come first
        take = (slice(None), slice(seam, None) if second else slice(0, seam))
    part = {k: batch[k][take] for k in ("input_ids", "labels", "position_ids", "router_weights")}
    part["sequence_ids"] = ids[take] - (n if second else 0)
    part["sequence_ids"][ids[take] < 0] = -1
    part["n_sequences"] = n
    return part


def preference_batch(examples: list[dict], pad_id: int, packed: bool = False,
                     share_prompt: bool = True) -> dict:
    """The batch of either data layout (micro_batch's collate for preference rows: one example
    each), padded or packed (pairs: each prompt once unless `share_prompt` is off)."""
    flat = [e for row in examples for e in row] if examples and isinstance(examples[0], list) \
        else examples
    if "label" in flat[0]:
        return unpaired_batch(flat, pad_id, packed)
    return pair_batch(flat, pad_id, packed, share_prompt)


def example_tokens(example: dict) -> int:
    """The tokens an example puts through the model (both of its rows)."""
    if "label" in example:
        return 2 * (len(example["prompt"]) + len(example["completion"]))
    return 2 * len(example["prompt"]) + len(example["chosen"]) + len(example["rejected"])
