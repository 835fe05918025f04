"""Is a converted model the trained one? The comparison, as plain functions of arrays and token ids.

Nothing here runs a model: export/check.py gathers the logits (our engine, llama.cpp, the merged
checkpoint) and hands them over, so every rule below is tested with made-up arrays.

Logits are compared at the positions whose next token carries a label (the responses of held-out
examples, the tokens training put loss on):
- next-token agreement: the share of positions where both pick the same most likely token;
- decisive agreement: the same, over the positions where the reference's top choice leads its
  second by at least DECISIVE_MARGIN nats. Where the reference is torn between two tokens any
  rounding may flip the pick, and that says nothing about the conversion; a wrong conversion
  (a permuted head, a shifted vocabulary) disagrees where the reference is sure. This is the one
  judged;
- mean KL(reference ‖ other) of the next-token distributions, in nats;
- perplexity of each on the same tokens, and their ratio.
Limits per file type are set a few times above what a correct conversion of a real model shows,
and far below what a broken one does (a broken conversion lands near chance: agreement of a few
percent, KL of several nats).

The chat round trip: the conversation rendered by the converted model's own chat template must
equal the reference's rendering, tokenize to the same ids, and — when the reference ends its turn
within the token budget — the converted model must stop on that same end-of-turn token.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

DECISIVE_MARGIN = 0.5  # nats between the reference's first and second choice


@dataclass(frozen=True)
class Limits:
    min_agreement: float  # on decisive positions
    max_kl: float
    max_ppl_ratio: float


# what a correct export must reach, per file type (docs/MERGE_AND_EXPORT.md says where the numbers
# come from); a merged checkpoint, per dtype
EXPORT_LIMITS = {
    "f16": Limits(0.98, 0.005, 1.01), "bf16": Limits(0.97, 0.01, 1.02),
    "q8_0": Limits(0.97, 0.01, 1.02), "q6_k": Limits(0.95, 0.03, 1.05),
    "q5_k_m": Limits(0.93, 0.05, 1.08), "q5_k_s": Limits(0.93, 0.05, 1.08),
    "q4_k_m": Limits(0.9, 0.15, 1.2), "q4_k_s": Limits(0.9, 0.15, 1.2), "q4_0": Limits(0.88, 0.2, 1.25),
    "q3_k_m": Limits(0.8, 0.35, 1.5), "q2_k": Limits(0.65, 1.0, 2.5),
}
MERGE_LIMITS = {"float32": Limits(0.999, 1e-4, 1.001), "float16": Limits(0.98, 0.005, 1.01),
                "bfloat16": Limits(0.97, 0.01, 1.02)}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare_logits(pairs: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict:
    """Statistics over (reference logits [n, V], other logits [n, V], next tokens [n]) triples,
    one per sequence (n positions each, the same positions in both)."""
    n = agree = decisive = decisive_agree = 0
    kl_sum, kl_max, nll_ref, nll_other = 0.0, 0.0, 0.0, 0.0
    for ref, other, targets in pairs:
        if ref.shape != other.shape or ref.shape[0] != len(targets):
            raise ValueError(f"logits of shapes {ref.shape} and {other.shape} for {len(targets)} tokens")
        lp_ref, lp_other = _log_softmax(ref), _log_softmax(other)
        top_ref, top_other = lp_ref.argmax(-1), lp_other.argmax(-1)
        same = top_ref == top_other
        top2 = np.sort(lp_ref, axis=-1)[:, -2:] if lp_ref.shape[-1] > 1 else np.zeros((len(lp_ref), 2))
        sure = (top2[:, 1] - top2[:, 0]) >= DECISIVE_MARGIN
        kl = (np.exp(lp_ref) * (lp_ref - lp_other)).sum(-1)
        rows = np.arange(len(targets))
        n += len(targets)
        agree += int(same.sum())
        decisive += int(sure.sum())
        decisive_agree += int((same & sure).sum())
        kl_sum += float(kl.sum())
        kl_max = max(kl_max, float(kl.max(initial=0.0)))
        nll_ref -= float(lp_ref[rows, targets].sum())
        nll_other -= float(lp_other[rows, targets].sum())
    if n == 0:
        raise ValueError("no positions to compare")
    ppl_ref, ppl_other = math.exp(nll_ref / n), math.exp(nll_other / n)
    return {"tokens": n, "agreement": agree / n,
            "decisive_tokens": decisive,
            "decisive_agreement": decisive_agree / decisive if decisive else None,
            "mean_kl": kl_sum / n, "max_kl": kl_max,
            "ppl_reference": ppl_ref, "ppl_other": ppl_other, "ppl_ratio": ppl_other / ppl_ref}


def judge_logits(stats: dict, limits: Limits) -> list[str]:
    """What is out of its limit, each as one sentence naming the measure (empty: all within)."""
    failures = []
    if stats["decisive_agreement"] is not None and stats["decisive_agreement"] < limits.min_agreement:
        failures.append(f"logits: next-token agreement {stats['decisive_agreement']:.1%} where the "
                        f"reference is sure ({stats['decisive_tokens']} tokens), below "
                        f"{limits.min_agreement:.0%}")
    if stats["mean_kl"] > limits.max_kl:
        failures.append(f"logits: mean KL {stats['mean_kl']:.4g} nats above {limits.max_kl:g}")
    if stats["ppl_ratio"] > limits.max_ppl_ratio:
        failures.append(f"perplexity: {stats['ppl_other']:.4g} against the reference's "
                        f"{stats['ppl_reference']:.4g} (ratio {stats['ppl_ratio']:.3f} above "
                        f"{limits.max_ppl_ratio:g})")
    return failures


def first_difference(a, b) -> int | None:
    """Index of the first element where sequences a and b differ (None when equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_chat(ref: dict, other: dict, token_name) -> tuple[dict, list[str]]:
    """ref / other: {text, prompt_ids, reply_ids, stopped_on} of one greedy chat turn (other may
    be {error}). token_name(id) → its text, for the messages. (summary, failures)."""
    if "error" in other:
        return {"error": other["error"]}, [f"chat template: {other['error']}"]
    summary = {"template_same": other["text"] == ref["text"],
               "prompt_tokens_same": other["prompt_ids"] == ref["prompt_ids"],
               "reference_stopped_on": ref["stopped_on"], "stopped_on": other["stopped_on"],
               "reference_reply_tokens": len(ref["reply_ids"]), "reply_tokens": len(other["reply_ids"])}
    failures = []
    if not summary["template_same"]:
        i = first_difference(ref["text"], other["text"])
        failures.append(f"chat template: the file's template renders the conversation differently "
                        f"from character {i}: {other['text'][i:i + 40]!r} instead of "
                        f"{ref['text'][i:i + 40]!r}")
    elif not summary["prompt_tokens_same"]:
        i = first_difference(ref["prompt_ids"], other["prompt_ids"])
        failures.append(f"tokenizer: the rendered prompt tokenizes differently from token {i}: "
                        f"{other['prompt_ids'][i:i + 5]} instead of {ref['prompt_ids'][i:i + 5]}")
    if ref["stopped_on"] is not None and other["stopped_on"] != ref["stopped_on"]:
        end = token_name(ref["stopped_on"])
        why = ("ran out of tokens" if other["stopped_on"] is None
               else f"stopped on {token_name(other['stopped_on'])!r}")
        failures.append(f"end of turn: the reference ends its answer with {end!r} but the file "
                        f"{why} ({len(other['reply_ids'])} tokens)")
    summary["reply_same_up_to"] = first_difference(ref["reply_ids"], other["reply_ids"])
    return summary, failures


def chat_line(summary: dict | None, token_name) -> str:
    """One line about the chat round trip, for the table."""
    if summary is None:
        return "chat round trip: not run (the model has no chat template)"
    if "error" in summary:
        return f"chat round trip: {summary['error']}"
    parts = ["template same" if summary["template_same"] else "template DIFFERENT",
             "prompt tokens same" if summary["prompt_tokens_same"] else "prompt tokens DIFFERENT"]
    ref_stop, stop = summary["reference_stopped_on"], summary["stopped_on"]
    if ref_stop is None:
        parts.append(f"the reference did not end its turn in {summary['reference_reply_tokens']} "
                     f"tokens, so the stop is not tested")
    elif stop == ref_stop:
        parts.append(f"stops on {token_name(stop)!r} after {summary['reply_tokens']} tokens "
                     f"(reference {summary['reference_reply_tokens']})")
    else:
        parts.append(f"does NOT stop on {token_name(ref_stop)!r}")
    same = summary["reply_same_up_to"]
    parts.append("reply same" if same is None else f"reply same for {same} tokens")
    return "chat round trip: " + " · ".join(parts)


def format_table(report: dict, token_name=str) -> str:
    """The short table `qlora export --check` / `qlora merge` print."""
    s, lim = report["logits"], report["limits"]
    col = report["engine_short"]
    dec = ("" if s["decisive_agreement"] is None else
           f"{s['decisive_agreement']:.1%} of {s['decisive_tokens']} sure tokens")
    rows = [
        f"check: {report['subject']} in {report['engine']} against {report['reference']}"
        + (f", {report['reference_run']}" if report.get("reference_run") else ""),
        f"  data: {report['data']} ({report['examples']} examples, {s['tokens']} tokens compared)",
        f"  {'':24}{'reference':>12}{col:>14}   limit",
        f"  {'next-token agreement':24}{'':>12}{s['agreement']:>14.1%}   ≥ {_percent(lim['min_agreement'])} "
        f"where sure ({dec or 'no sure tokens'})",
        f"  {'mean KL (nats)':24}{'':>12}{s['mean_kl']:>14.3g}   ≤ {lim['max_kl']:g}",
        f"  {'perplexity':24}{s['ppl_reference']:>12.4g}{s['ppl_other']:>14.4g}   "
        f"ratio {s['ppl_ratio']:.3f} ≤ {lim['max_ppl_ratio']:g}",
    ]
    if "chat" in report:
        rows.append("  " + chat_line(report["chat"], token_name))
    verdict = "passed" if not report["failures"] else "FAILED: " + "; ".join(report["failures"])
    rows.append(f"  {verdict}")
    return "\n".join(rows)


def _percent(x: float) -> str:
    return f"{x:.0%}" if round(x * 100, 6).is_integer() else f"{x:.1%}"


def limits_dict(limits: Limits) -> dict:
    return asdict(limits)
