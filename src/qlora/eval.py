"""`qlora eval`: perplexity on a data file and, for instruction data, generation metrics.

Perplexity is measured on exactly the tokens training puts loss on (the responses of instruction
and chat data, all of a text): examples are encoded by the data layer, packed padding-free into
rows of at most max_len tokens (documents never attend to each other), and the model's loss_sum
adds up token cross-entropies; ppl = exp(total / tokens). For data with a prompt/response split,
each prompt is also answered greedily and compared with its reference: exact match (after
stripping whitespace), ROUGE-L F1 (rouge-score) and corpus BLEU (sacrebleu).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qlora.errors import QloraError
from qlora.files import refuse_existing, staged_file
from qlora.infer import GenerationOptions
from qlora.models.decoder import IGNORE_INDEX as IGNORE

GENERATIVE_FORMATS = ("alpaca", "prompt_completion", "sharegpt", "messages")


# --- metrics ----------------------------------------------------------------------------------
def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to their reference after stripping outer whitespace."""
    _same_length(predictions, references)
    if not predictions:
        return 0.0
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(predictions)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 (rouge-score's tokenizer: lower case, alphanumeric words; no stemming)."""
    from rouge_score import rouge_scorer

    _same_length(predictions, references)
    if not predictions:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(r.strip(), p.strip())["rougeL"].fmeasure
              for p, r in zip(predictions, references)]
    return sum(scores) / len(scores)


def bleu(predictions: list[str], references: list[str]) -> float:
    """sacrebleu's corpus BLEU (0..100) with one reference per prediction, default settings."""
    import sacrebleu

    _same_length(predictions, references)
    if not predictions:
        return 0.0
    return float(sacrebleu.corpus_bleu([p.strip() for p in predictions],
                                       [[r.strip() for r in references]]).score)


def bleu_blind_note(references: list[str]) -> str | None:
    """A line saying why BLEU is 0 where no reference has 4 tokens (sacrebleu's default 13a
    tokens): no 4-gram can match, so BLEU is 0 however good the answers, as exact match shows."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tokenize = Tokenizer13a()
    if references and all(len(tokenize(r.strip()).split()) < 4 for r in references):
        return ("note: every reference answer is shorter than 4 tokens, so no 4-gram can match and "
                "BLEU is 0 whatever the answers; exact match and ROUGE-L measure them")
    return None


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    return {"exact_match": exact_match(predictions, references),
            "rougeL": rouge_l(predictions, references),
            "bleu": bleu(predictions, references)}


def _same_length(predictions, references) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")


# --- the data ---------------------------------------------------------------------------------
@dataclass
class EvalData:
    """A data file, encoded once and evaluated with every model (base, adapter)."""

    path: str
    format: str
    encoded: list[dict]  # {"input_ids", "labels"} as training sees them
    prompts: list[tuple[list[int], str]]  # (prompt ids, reference) for generation; [] if none
    n_rows: int = 0
    n_truncated: int = 0
    n_dropped: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def n_label_tokens(self) -> int:
        return sum(sum(t != IGNORE for t in e["labels"][1:]) for e in self.encoded)


def load_eval_data(path: str, tokenizer, max_len: int, max_samples: int | None = None,
                   chat_template: str | None = None) -> EvalData:
    """The first max_samples usable examples of `path`, encoded as training would encode them
    (loss on responses), cut to max_len tokens; plus prompts and references to generate from."""
    from qlora.data import encode_example, encode_prompt, load_examples, summarize_problems

    if not Path(path).exists():
        raise QloraError(f"data file {path} not found")
    if max_samples is not None and max_samples < 1:
        raise QloraError(f"--max-samples must be at least 1, got {max_samples}")
    examples, problems = load_examples(path)
    n_rows = len(examples) + len(problems)
    if max_samples is not None:
        examples = examples[:max_samples]
    if not examples:
        why = "; ".join(summarize_problems(problems)) or "the file has no rows"
        raise QloraError(f"data file {path}: no usable examples ({why})")
    fmt = examples[0].format
    data = EvalData(path=str(path), format=fmt, encoded=[], prompts=[], n_rows=n_rows,
                    problems=summarize_problems(problems))
    from jinja2 import TemplateError

    for ex in examples:
        try:
            enc = encode_example(ex, tokenizer, "responses", chat_template)
        except (QloraError, TemplateError) as e:
            raise QloraError(f"{ex.source}: {e}") from e
        if len(enc["input_ids"]) > max_len:
            enc = {"input_ids": enc["input_ids"][:max_len], "labels": enc["labels"][:max_len]}
            data.n_truncated += 1
        if all(t == IGNORE for t in enc["labels"][1:]):
            data.n_dropped += 1
            data.problems.append(f"{ex.source}: no response tokens within max_len={max_len}, "
                                 "left out of perplexity")
            continue
        data.encoded.append(enc)
        if ex.format in GENERATIVE_FORMATS:
            data.prompts.append(encode_prompt(ex, tokenizer, chat_template))
    if not data.encoded:
        raise QloraError(f"data file {path}: no example has response tokens within "
                         f"max_len={max_len}; raise --max-len")
    return data


# --- evaluating one model ---------------------------------------------------------------------
@torch.no_grad()
@torch.no_grad()
def loss_sums(model, encoded: list[dict], max_len: int, micro_batch: int = 4, pad_id: int = 0,
              packing: bool = True, shard: tuple[int, int] = (0, 1)) -> tuple[float, int]:
    """(summed cross-entropy, number of label tokens) of `encoded`, in rows of at most max_len
    tokens (packed padding-free unless `packing` is off). `shard=(rank, ranks)`: this process
    takes every ranks-th micro-batch (evaluation under torchrun; the caller sums over ranks)."""
    from qlora.data import build_rows, make_batch
    from qlora.models.decoder import compute_device

    rank, ranks = shard
    was_training = model.training
    model.eval()
    device = compute_device(model)
    # a model that would let packed documents see each other (generic path) gets padded rows
    rows = build_rows(encoded, max_len, packing=packing and model.packs_documents)
    total, n_tokens = 0.0, 0
    try:
        for k, start in enumerate(range(0, len(rows), micro_batch)):
            if k % ranks != rank:
                continue
            batch = make_batch([[encoded[i] for i in row] for row in rows[start:start + micro_batch]],
                               pad_id)
            labels = batch["labels"]
            # the model predicts labels[t+1] from position t: these are the tokens it scores
            n = int((labels[:, 1:] != IGNORE).sum())
            if n == 0:
                continue
            total += float(model(batch["input_ids"].to(device), batch["position_ids"], labels,
                                 real_lengths=batch["real_lengths"]))
            n_tokens += n
    finally:
        model.train(was_training)
    return total, n_tokens


def perplexity_of(mean_loss: float) -> float:
    return math.exp(mean_loss) if mean_loss < 700 else float("inf")


def perplexity(model, encoded: list[dict], max_len: int, micro_batch: int = 4, pad_id: int = 0
               ) -> dict[str, float]:
    """{"loss_sum", "n_tokens", "loss" (mean nats/token), "perplexity"} over the label tokens."""
    total, n_tokens = loss_sums(model, encoded, max_len, micro_batch, pad_id)
    if n_tokens == 0:
        raise QloraError("no tokens to score: every example's labels are masked")
    mean = total / n_tokens
    return {"loss_sum": total, "n_tokens": n_tokens, "loss": mean, "perplexity": perplexity_of(mean)}


def predict(model, tokenizer, prompts: list[tuple[list[int], str]], opts: GenerationOptions,
            context: int) -> tuple[list[str], list[str], int]:
    """Greedy answers to the prompts that fit the context: (predictions, references, skipped)."""
    from qlora.chat import fit_max_new_tokens, stream_reply

    preds, refs, skipped = [], [], 0
    for ids, ref in prompts:
        try:
            fitted, _ = fit_max_new_tokens(len(ids), opts, context, "prompt")
        except QloraError:
            skipped += 1
            continue
        _, text = stream_reply(model, tokenizer, ids, fitted)
        preds.append(text)
        refs.append(ref)
    return preds, refs, skipped


def evaluate_model(model, tokenizer, data: EvalData, max_len: int, opts: GenerationOptions | None,
                   micro_batch: int = 4) -> tuple[dict, list[dict]]:
    """(numbers, predictions) of one model on `data`; opts None = perplexity only."""
    t0 = time.perf_counter()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    result = perplexity(model, data.encoded, max_len, micro_batch, pad)
    result["ppl_time_s"] = round(time.perf_counter() - t0, 3)
    samples: list[dict] = []
    if opts is not None and data.prompts:
        t1 = time.perf_counter()
        preds, refs, skipped = predict(model, tokenizer, data.prompts, opts,
                                       model.spec.max_position_embeddings)
        result.update(generation_metrics(preds, refs))
        result["n_generated"] = len(preds)
        result["n_skipped_too_long"] = skipped
        result["generation_time_s"] = round(time.perf_counter() - t1, 3)
        samples = [{"reference": r, "prediction": p} for p, r in zip(preds, refs)]
    return result, samples


# --- the command ------------------------------------------------------------------------------
ROWS = [("loss", "loss (nats/token)", "{:.4f}"), ("perplexity", "perplexity", "{:.3f}"),
        ("exact_match", "exact match", "{:.1%}"), ("rougeL", "ROUGE-L F1", "{:.4f}"),
        ("bleu", "BLEU", "{:.2f}"), ("n_tokens", "tokens scored", "{}"),
        ("n_generated", "answers generated", "{}")]


def format_table(results: dict[str, dict]) -> str:
    """Metrics in rows, one column per model (base, adapter), and the change when there are two."""
    names = list(results)
    two = len(names) == 2
    header = ["metric"] + names + (["change"] if two else [])
    lines = [header]
    for key, label, fmt in ROWS:
        if not all(key in results[n] for n in names):
            continue
        row = [label] + [fmt.format(results[n][key]) for n in names]
        if two and key not in ("n_tokens", "n_generated"):
            a, b = results[names[0]][key], results[names[1]][key]
            delta = b - a
            row.append(f"{delta:+.1%}" if key == "exact_match" else f"{delta:+.4g}")
        elif two:
            row.append("")
        lines.append(row)
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))) for r in lines)


def check_report_path(path: str | Path) -> None:
    """Refuse a --report that exists or whose folder does not, before the slow part."""
    out = Path(path)
    refuse_existing(out, "--report")
    if not out.parent.exists():
        raise QloraError(f"--report {path}: directory {out.parent} does not exist")


def write_report(path: str | Path, report: dict) -> Path:
    """Write the JSON report through a temp file, so a crash never leaves half of one; a file that
    appeared at `path` meanwhile is refused, not overwritten."""
    out = Path(path)
    check_report_path(out)
    with staged_file(out) as tmp:
        tmp.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
        refuse_existing(out, "--report")  # made while the report was written: it is left alone
    return out


def run_eval(model_dir: str, data_path: str, adapter_dir: str | None = None, *,
             compare_base: bool = False, quant: str = "nf4", device: str = "auto",
             max_samples: int | None = None, max_len: int | None = None, micro_batch: int = 4,
             generate: bool = True, max_new_tokens: int = 128, chat_template: str | None = None,
             report_path: str | None = None, log: Callable[[str], None] = print,
             ignore_base_name: bool = False) -> dict:
    """Evaluate the model (with the adapter; and without it too when compare_base) and return
    the report; write it to report_path as JSON when given. An adapter naming another base is
    refused before the data loads, unless `ignore_base_name` (--ignore-base-name)."""
    from qlora.adapters import check_adapter_base
    from qlora.chat import stop_token_ids
    from qlora.data import resolve_chat_template
    from qlora.infer import load_for_inference
    from qlora.models import load_tokenizer, read_model_spec
    from qlora.models.decoder import compute_device

    if compare_base and adapter_dir is None:
        raise QloraError("--compare-base needs --adapter (it compares the base with the adapter)")
    if not Path(model_dir).is_dir():
        raise QloraError(f"model directory {model_dir} not found (--model takes a directory in "
                         "Hugging Face layout: config.json, *.safetensors, tokenizer.json)")
    check_adapter_base(model_dir, adapter_dir, ignore_base_name)
    if report_path is not None:
        check_report_path(report_path)  # fail before the slow part
    if micro_batch < 1:
        raise QloraError(f"--batch-size must be at least 1, got {micro_batch}")
    t0 = time.perf_counter()
    spec = read_model_spec(model_dir)
    context = spec.max_position_embeddings
    if max_len is None:
        max_len = min(context, 2048)
    if not 2 <= max_len <= context:
        raise QloraError(f"--max-len must be between 2 and the model's context ({context}), "
                         f"got {max_len}")
    tokenizer = load_tokenizer(model_dir)
    data = load_eval_data(data_path, tokenizer, max_len, max_samples, chat_template)
    log(f"{data_path}: {len(data.encoded)} examples ({data.format}), {data.n_label_tokens} tokens "
        f"scored" + (f", {data.n_truncated} cut to {max_len} tokens" if data.n_truncated else "")
        + (f", {len(data.prompts)} prompts to answer" if generate and data.prompts else ""))
    for p in data.problems:
        log(f"  {p}")
    template = None
    if chat_template is not None or getattr(tokenizer, "chat_template", None):
        template = resolve_chat_template(tokenizer, chat_template)
    stops = stop_token_ids(tokenizer, model_dir, template)
    opts = (GenerationOptions(max_new_tokens=max_new_tokens, eos_token_ids=stops)
            if generate and data.prompts else None)

    runs = (["base", "adapter"] if compare_base else ["adapter" if adapter_dir else "base"])
    results, predictions, settings_device, model_packs = {}, {}, None, True
    for name in runs:
        log(f"evaluating {name} ({model_dir}" + (f" + {adapter_dir}" if name == "adapter" else "")
            + ") ...")
        model, _ = load_for_inference(model_dir, adapter_dir if name == "adapter" else None,
                                      quant=quant, device=device,
                                      ignore_base_name=True)  # checked above
        settings_device, model_packs = compute_device(model), model.packs_documents
        results[name], predictions[name] = evaluate_model(model, tokenizer, data, max_len, opts,
                                                          micro_batch)
        del model
        if settings_device.type == "cuda":
            torch.cuda.empty_cache()
    from qlora.device import compute_dtype

    report = {
        "model": str(model_dir),
        "adapter": None if adapter_dir is None else str(adapter_dir),
        "data": str(data_path),
        "format": data.format,
        "settings": {
            "quant": quant, "device": str(settings_device),
            "compute_dtype": str(compute_dtype(settings_device)).removeprefix("torch."),
            "max_len": max_len, "max_samples": max_samples, "batch_size": micro_batch,
            "packing": "padding-free" if model_packs else "padded rows", "loss_on": "responses",
            "generation": None if opts is None else {
                "decoding": "greedy", "max_new_tokens": max_new_tokens,
                "stop_token_ids": list(stops)},
            "chat_template": chat_template, "compare_base": compare_base,
        },
        "data_stats": {"n_rows": data.n_rows, "n_examples": len(data.encoded),
                       "n_label_tokens": data.n_label_tokens, "n_prompts": len(data.prompts),
                       "n_truncated": data.n_truncated, "n_dropped": data.n_dropped,
                       "problems": data.problems},
        "results": results,
        "predictions": predictions,
        "wall_time_s": round(time.perf_counter() - t0, 3),
    }
    log(format_table(results))
    note = bleu_blind_note([ref for _, ref in data.prompts]) if opts is not None else None
    if note:
        log(note)
    if report_path is not None:
        write_report(report_path, report)
        log(f"report written to {report_path}")
    return report
