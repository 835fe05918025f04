"""`qlora eval`: metrics against hand-computed values, perplexity against transformers (and PEFT
for the adapter) on the same tokens, the base-vs-adapter report, and bad inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from qlora import cli
from qlora.eval import (bleu, bleu_blind_note, exact_match, generation_metrics, perplexity,
                        rouge_l)
from qlora.tiny import build_tiny_model

ALPACA = [
    {"instruction": "Say hi", "input": "", "output": "hi"},
    {"instruction": "Capitalise the word.", "input": "cold", "output": "COLD"},
    {"instruction": "Count to three", "input": "", "output": "1 2 3"},
    {"instruction": "Name a colour", "input": "", "output": "the sky is blue"},
]
CHATS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello!"}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "user", "content": "name a fruit"},
                  {"role": "assistant", "content": "apple"}]},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from qlora.adapters import AdapterConfig, attach_adapters, save_adapter
    from qlora.models import load_model
    from qlora.quant import QuantConfig

    root = tmp_path_factory.mktemp("eval")
    model_dir = build_tiny_model(root / "tiny-llama", "llama", seed=3)
    m = load_model(model_dir, QuantConfig(method="none", compute_dtype=torch.float32))
    attach_adapters(m, AdapterConfig(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapter change something
                p.normal_(0, 0.2)
    adapter = save_adapter(m, root / "adapter", str(model_dir))
    return {"root": root, "model": model_dir, "adapter": adapter,
            "alpaca": _jsonl(root / "alpaca.jsonl", ALPACA),
            "chat": _jsonl(root / "chat.jsonl", CHATS)}


# --- metrics, by hand ---------------------------------------------------------------------------
def test_exact_match_by_hand():
    preds = ["Paris", " 42 \n", "blue sky", "no"]
    refs = ["Paris", "42", "the blue sky", "yes"]
    # equal after strip: "Paris" and "42" → 2 of 4
    assert exact_match(preds, refs) == 0.5
    assert exact_match([], []) == 0.0


def test_rouge_l_by_hand():
    preds = ["the cat sat on the mat", "a b c d", "hello world", "x y", ""]
    refs = ["the cat is on the mat", "d c b a", "Hello, World!", "x y z w", "something"]
    # 1: LCS "the cat on the mat" = 5 of 6 and 6 tokens: P = R = 5/6, F1 = 5/6
    # 2: reversed order, LCS = 1: P = R = 1/4, F1 = 1/4
    # 3: rouge-score lower-cases and drops punctuation: identical, F1 = 1
    # 4: LCS "x y" = 2: P = 2/2, R = 2/4, F1 = 2·1·0.5 / 1.5 = 2/3
    # 5: empty prediction: F1 = 0
    expected = (5 / 6 + 1 / 4 + 1 + 2 / 3 + 0) / 5
    assert rouge_l(preds, refs) == pytest.approx(expected, abs=1e-12)


def test_bleu_of_answers_under_four_tokens_is_explained():
    """sacrebleu gives 0 to perfect answers of under 4 tokens (no 4-gram to match): eval says so."""
    short = ["COLD", "WARM", "a b c"]
    assert bleu(short, short) == 0.0
    assert "shorter than 4 tokens" in bleu_blind_note(short)
    assert bleu_blind_note(short + ["a b c d"]) is None  # one 4-gram to match: BLEU measures
    assert bleu_blind_note(["a b c."]) is None  # the full stop is a 4th token to sacrebleu


def test_bleu_reference_points():
    refs = ["the quick brown fox jumps over the lazy dog", "a b c d e"]
    assert bleu(refs, refs) == pytest.approx(100.0)
    assert bleu(["one two three four five six seven eight nine", "v w x y z"], refs) == 0.0
    # one sentence "a b c d e" vs "a b c d f": 1-grams 4/5, 2-grams 3/4, 3-grams 2/3, 4-grams 1/2,
    # same length (no brevity penalty): 100 · (4/5 · 3/4 · 2/3 · 1/2) ** (1/4) = 100 · 0.2 ** 0.25
    assert bleu(["a b c d e"], ["a b c d f"]) == pytest.approx(100 * 0.2 ** 0.25, abs=1e-6)


def test_generation_metrics_together():
    m = generation_metrics(["a b c d e", "x"], ["a b c d e", "y"])
    assert m["exact_match"] == 0.5
    assert m["rougeL"] == pytest.approx(0.5)  # 1 and 0
    assert set(m) == {"exact_match", "rougeL", "bleu"}


# --- perplexity against transformers ------------------------------------------------------------
def _hf_loss(model_dir, encoded, adapter=None) -> tuple[float, int]:
    """Sum of token cross-entropies and their count, one example at a time (no packing)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        hf = PeftModel.from_pretrained(hf, str(adapter)).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for e in encoded:
            ids = torch.tensor([e["input_ids"]])
            labels = torch.tensor(e["labels"])
            logits = hf(input_ids=ids).logits[0].float()
            total += float(F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum"))
            n += int((labels[1:] != -100).sum())
    return total, n


@pytest.mark.parametrize("kind", ["alpaca", "chat"])
def test_perplexity_equals_transformers(setup, kind):
    from qlora.data import encode_example, load_examples, pack_examples, prepare
    from qlora.models import load_model, load_tokenizer
    from qlora.quant import QuantConfig

    tok = load_tokenizer(setup["model"])
    raw, _ = load_examples(setup[kind])
    encoded = [encode_example(e, tok) for e in raw]
    assert len(pack_examples(encoded, 512)) < len(encoded)  # several documents share a row
    model = load_model(setup["model"], QuantConfig(method="none", compute_dtype=torch.float32))
    ours = perplexity(model, encoded, max_len=512)
    total, n = _hf_loss(setup["model"], encoded)
    assert ours["n_tokens"] == n
    # the tokens training scores: the data layer's own count for the file
    _, report = prepare(setup[kind], tok, cache=False)
    assert n == report.n_label_tokens
    assert ours["loss_sum"] == pytest.approx(total, rel=1e-5)
    assert ours["perplexity"] == pytest.approx(math.exp(total / n), rel=1e-5)


def test_cli_report_base_vs_adapter(setup, tmp_path, capsys):
    from qlora.data import encode_example, encode_prompt, load_examples
    from qlora.infer import GenerationOptions, generate
    from qlora.models import load_model, load_tokenizer
    from qlora.quant import QuantConfig

    report_file = tmp_path / "report.json"
    rc = cli.main(["eval", "--model", str(setup["model"]), "--adapter", str(setup["adapter"]),
                   "--compare-base", "--data", setup["alpaca"], "--quant", "none", "--device", "cpu",
                   "--max-new-tokens", "6", "--max-samples", "3", "--report", str(report_file)])
    out = capsys.readouterr().out
    assert rc == 0
    report = json.loads(report_file.read_text())
    assert list(report["results"]) == ["base", "adapter"]
    assert report["settings"]["quant"] == "none" and report["settings"]["max_samples"] == 3
    assert report["data_stats"]["n_examples"] == 3
    header = next(line for line in out.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "base", "adapter", "change"]

    tok = load_tokenizer(setup["model"])
    raw, _ = load_examples(setup["alpaca"])
    encoded = [encode_example(e, tok) for e in raw[:3]]
    base_total, n = _hf_loss(setup["model"], encoded)
    lora_total, _ = _hf_loss(setup["model"], encoded, adapter=setup["adapter"])
    base, lora = report["results"]["base"], report["results"]["adapter"]
    assert base["n_tokens"] == lora["n_tokens"] == n
    assert base["perplexity"] == pytest.approx(math.exp(base_total / n), rel=1e-5)
    assert lora["perplexity"] == pytest.approx(math.exp(lora_total / n), rel=1e-5)
    assert abs(base["loss"] - lora["loss"]) > 1e-3  # the adapter does something

    # the answers are greedy generation from the data layer's prompts, scored by the metrics
    model = load_model(setup["model"], QuantConfig(method="none", compute_dtype=torch.float32))
    preds = []
    for e in raw[:3]:
        ids, _ = encode_prompt(e, tok)
        new = generate(model, ids, GenerationOptions(max_new_tokens=6, eos_token_ids=(2, 4)))
        preds.append(tok.decode([t for t in new if t not in (2, 4)], skip_special_tokens=True))
    assert [s["prediction"] for s in report["predictions"]["base"]] == preds
    refs = [e["output"] for e in ALPACA[:3]]
    assert [s["reference"] for s in report["predictions"]["base"]] == refs
    assert base["exact_match"] == exact_match(preds, refs)
    assert base["rougeL"] == pytest.approx(rouge_l(preds, refs))


def test_cli_text_data_is_perplexity_only(setup, tmp_path, capsys):
    data = _jsonl(tmp_path / "text.jsonl", [{"text": "hello world"}, {"text": "abc def"}])
    report_file = tmp_path / "r.json"
    assert cli.main(["eval", "--model", str(setup["model"]), "--data", data, "--quant", "none",
                     "--report", str(report_file)]) == 0
    report = json.loads(report_file.read_text())
    assert list(report["results"]) == ["base"]
    res = report["results"]["base"]
    assert "exact_match" not in res and res["n_tokens"] == len("hello world") + len("abc def")


def test_bad_inputs(setup, tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert cli.main(["eval", "--model", str(setup["model"]), "--data", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    no_model = tmp_path / "no-model"
    assert cli.main(["eval", "--model", str(no_model), "--data", setup["alpaca"]]) == 2
    assert str(no_model) in capsys.readouterr().err
    assert cli.main(["eval", "--model", str(setup["model"]), "--data", setup["alpaca"],
                     "--compare-base"]) == 2
    assert "--adapter" in capsys.readouterr().err
    report = tmp_path / "no-dir" / "r.json"
    assert cli.main(["eval", "--model", str(setup["model"]), "--data", setup["alpaca"],
                     "--report", str(report)]) == 2
    assert str(report) in capsys.readouterr().err
    # an existing report is refused up front (as merge and export refuse existing outputs), untouched
    report = tmp_path / "r.json"
    report.write_text("mine\n")
    assert cli.main(["eval", "--model", str(setup["model"]), "--data", setup["alpaca"],
                     "--report", str(report)]) == 2
    err = capsys.readouterr().err
    assert f"--report {report} exists" in err and "new --report path" in err
    assert report.read_text() == "mine\n"
    for bad in ("0", "100000"):
        assert cli.main(["eval", "--model", str(setup["model"]), "--data", setup["alpaca"],
                         "--max-len", bad]) == 2
        assert "--max-len" in capsys.readouterr().err
    assert cli.main(["eval", "--model", str(setup["model"]), "--data", setup["alpaca"],
                     "--device", "gpu"]) == 2
    assert "'gpu'" in capsys.readouterr().err


def test_write_report_never_replaces_a_file_and_leaves_no_partial_one(tmp_path):
    from qlora.errors import QloraError
    from qlora.eval import write_report

    path = tmp_path / "r.json"
    assert json.loads(write_report(path, {"a": 1}).read_text()) == {"a": 1}
    with pytest.raises(QloraError, match="--report"):
        write_report(path, {"a": 2})  # the file now exists: refused, not replaced
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no staged file left behind
