"""`qlora export --check`, `qlora merge`'s check and the importance matrix.

The comparison (export/parity.py) is tested on made-up arrays. The whole check runs on a tiny model
that was actually trained: a random llama (hidden 256, so every row fills k-quant blocks) with a
LoRA adapter trained for a few dozen steps to answer every ChatML turn with "OK, done." and
<|im_end|>, so that its predictions at the answer's tokens are confident and its chat turns end.
The targets (CI, tiny models): q8_0 next-token agreement 100 % with the trained model, q4_k_m
≥ 95 %, the chat stopping on <|im_end|>, for llama and, each trained the same way, every other
native family, shown here without llama.cpp (the GGUF's dequantized weights in our own engine) and, where
llama-cpp-python is importable (or $QLORA_LLAMA_PYTHON names a python that has it), in llama.cpp.
"""

from __future__ import annotations

import json
import random
import shutil
import string

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from qlora.errors import QloraError  # noqa: E402
from qlora.export import parity  # noqa: E402
from qlora.export.check import check_gguf, find_llama_python  # noqa: E402
from qlora.export.gguf import export_gguf  # noqa: E402
from qlora.tiny import build_tiny_model  # noqa: E402

ANSWER = "OK, done."


# --- the comparison, on arrays ------------------------------------------------------------------
def _logits(n=50, vocab=20, seed=0, scale=4.0):
    return np.random.default_rng(seed).standard_normal((n, vocab)).astype(np.float32) * scale


def test_identical_logits_agree_fully():
    ref = _logits()
    targets = ref.argmax(-1)
    s = parity.compare_logits([(ref, ref.copy(), targets)])
    assert s["agreement"] == 1.0 and s["decisive_agreement"] == 1.0 and s["tokens"] == 50
    assert abs(s["mean_kl"]) < 1e-12 and s["ppl_ratio"] == pytest.approx(1.0)
    assert parity.judge_logits(s, parity.EXPORT_LIMITS["f16"]) == []


def test_kl_and_perplexity_are_the_textbook_ones():
    ref, other = np.log(np.array([[0.5, 0.5]])), np.log(np.array([[0.9, 0.1]]))
    s = parity.compare_logits([(ref, other, np.array([0]))])
    assert s["mean_kl"] == pytest.approx(0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1))
    assert s["ppl_reference"] == pytest.approx(2.0) and s["ppl_other"] == pytest.approx(1 / 0.9)


def test_near_ties_do_not_count_against_the_conversion():
    ref = np.array([[2.0, 1.99, -3.0], [5.0, 0.0, 0.0]])  # torn, then sure
    other = np.array([[1.99, 2.0, -3.0], [5.0, 0.0, 0.0]])  # flips the torn one only
    s = parity.compare_logits([(ref, other, np.array([0, 0]))])
    assert s["agreement"] == 0.5 and s["decisive_tokens"] == 1 and s["decisive_agreement"] == 1.0


def test_a_broken_conversion_fails_naming_logits_and_perplexity():
    ref = _logits(200, 50)
    targets = ref.argmax(-1)
    shifted = np.roll(ref, 1, axis=-1)  # a vocabulary off by one
    failures = parity.judge_logits(parity.compare_logits([(ref, shifted, targets)]),
                                   parity.EXPORT_LIMITS["q4_k_m"])
    assert len(failures) == 3
    assert failures[0].startswith("logits: next-token agreement") and "below 90%" in failures[0]
    assert failures[1].startswith("logits: mean KL") and failures[2].startswith("perplexity:")
    with pytest.raises(ValueError, match="shapes"):
        parity.compare_logits([(ref, ref[:, :10], targets)])


CHAT = {"text": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "prompt_ids": [3, 1, 2, 4],
        "reply_ids": [7, 8, 4], "stopped_on": 4}


def _name(i):
    return {4: "<|im_end|>", 2: "</s>"}.get(i, f"t{i}")


def test_chat_round_trip_parts():
    summary, failures = parity.compare_chat(CHAT, dict(CHAT), _name)
    assert failures == [] and summary["reply_same_up_to"] is None
    assert "stops on '<|im_end|>' after 3 tokens" in parity.chat_line(summary, _name)
    _, failures = parity.compare_chat(CHAT, {**CHAT, "text": CHAT["text"].replace("user", "User")}, _name)
    assert failures[0].startswith("chat template: ") and "character 12" in failures[0]
    _, failures = parity.compare_chat(CHAT, {**CHAT, "prompt_ids": [3, 1, 9, 4]}, _name)
    assert failures[0].startswith("tokenizer: ") and "from token 2" in failures[0]
    _, failures = parity.compare_chat(CHAT, {**CHAT, "reply_ids": [7] * 48, "stopped_on": None}, _name)
    assert failures == ["end of turn: the reference ends its answer with '<|im_end|>' but the file ran "
                        "out of tokens (48 tokens)"]
    _, failures = parity.compare_chat(CHAT, {**CHAT, "stopped_on": 2}, _name)
    assert "stopped on '</s>'" in failures[0]
    # a reference that never ends its turn cannot test the stop
    summary, failures = parity.compare_chat({**CHAT, "stopped_on": None}, {**CHAT, "stopped_on": None}, _name)
    assert failures == [] and "stop is not tested" in parity.chat_line(summary, _name)


def test_the_training_run_is_found_from_any_adapter_it_wrote(tmp_path):
    from qlora.export.check import find_run_config

    (tmp_path / "run" / "checkpoints" / "step-9" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "best_adapter").mkdir()
    (tmp_path / "run" / "run_config.yaml").write_text("model: m\n")
    for adapter in ("run", "run/best_adapter", "run/checkpoints/step-9/adapter"):
        assert find_run_config(tmp_path / adapter) == (tmp_path / "run" / "run_config.yaml").resolve()
    assert find_run_config(tmp_path) is None and find_run_config(None) is None


# --- a trained tiny model -----------------------------------------------------------------------
def _words(n):
    rng, out = random.Random(0), set()
    while len(out) < n:
        out.add("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.choice((3, 4, 5)))))
    return sorted(out)


def _conversation(word):
    return {"messages": [{"role": "user", "content": word}, {"role": "assistant", "content": ANSWER}]}


def _train(root, family, steps, lr=1e-2, **sizes):
    """(root, base dir, adapter dir, held-out data file): a tiny `family` model and an adapter
    trained for `steps` steps to answer every turn with ANSWER and <|im_end|>."""
    from qlora.adapters import AdapterConfig, attach_adapters, save_adapter
    from qlora.config import RunConfig, save_config
    from qlora.data import prepare
    from qlora.data.packing import make_batch
    from qlora.models import load_model, load_tokenizer
    from qlora.quant import QuantConfig

    base = build_tiny_model(root / "base", family, **sizes)
    words = _words(200)
    for name, part in (("train.jsonl", words[:180]), ("val.jsonl", words[180:])):
        (root / name).write_text("".join(json.dumps(_conversation(w)) + "\n" for w in part))
    tokenizer = load_tokenizer(base)
    examples, _ = prepare(str(root / "train.jsonl"), tokenizer, cache=False)
    torch.manual_seed(0)
    model = load_model(base, QuantConfig(method="none", compute_dtype=torch.float32))
    attach_adapters(model, AdapterConfig(r=8, alpha=16, dropout=0.0))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(0)
    for _ in range(steps):
        batch = make_batch([[examples[rng.randrange(len(examples))]] for _ in range(8)], tokenizer.pad_token_id)
        loss = model(batch["input_ids"], batch["position_ids"], labels=batch["labels"])
        opt.zero_grad()
        (loss / (batch["labels"][:, 1:] != -100).sum()).backward()
        opt.step()
    run = root / "run"
    save_adapter(model, run, str(base))
    # the training run's record: the check finds its held-out data through it
    save_config(RunConfig(model=str(base), data=str(root / "train.jsonl"), val_data=str(root / "val.jsonl"),
                          output_dir=str(run)), run / "run_config.yaml")
    return root, base, run, root / "val.jsonl"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A random llama (hidden 256) + an adapter trained to answer: _train."""
    return _train(tmp_path_factory.mktemp("trained"), "llama", 16, hidden_size=256, intermediate_size=512,
                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.05)


@pytest.mark.parametrize("qtype,target", [("q8_0", 1.0), ("q4_k_m", 0.95)])
def test_gguf_reaches_the_targets_without_llama_cpp(trained, tmp_path, qtype, target):
    root, base, adapter, _ = trained
    out = export_gguf(base, tmp_path / "m.gguf", qtype, adapter_dir=adapter)
    lines = []
    report = check_gguf(out, base, qtype, adapter_dir=adapter, engine="qlora", device="cpu", log=lines.append)
    assert report["passed"] and report["logits"]["agreement"] >= target, report["logits"]
    assert report["data"].startswith(str(root / "val.jsonl"))  # found through run_config.yaml
    assert report["logits"]["tokens"] == 8 * (len(ANSWER) + 1)  # the answers and <|im_end|>
    assert report["chat"]["template_same"] and report["chat"]["prompt_tokens_same"]
    assert report["chat"]["stopped_on"] == report["chat"]["reference_stopped_on"] == 4  # <|im_end|>
    saved = json.loads((tmp_path / "m.check.json").read_text())
    assert saved["logits"] == report["logits"] and saved["passed"]
    assert "next-token agreement" in lines[0] and "stops on '<|im_end|>'" in lines[0]


def test_a_wrong_file_fails_naming_the_part(trained, tmp_path):
    """A template that renders differently, and an output head with two tokens swapped."""
    from safetensors.torch import load_file, save_file

    _, base, adapter, data = trained
    other = tmp_path / "other"
    shutil.copytree(base, other)
    template = (other / "chat_template.jinja").read_text()
    (other / "chat_template.jinja").write_text(template.replace("'<|im_start|>' + message['role']",
                                                                "'<|im_start|>' + message['role'] + ' '"))
    weights = load_file(str(other / "model.safetensors"))
    vocab = json.loads((other / "tokenizer.json").read_text())["model"]["vocab"]
    head = weights["lm_head.weight"]
    head[[vocab["O"], vocab["K"]]] = head[[vocab["K"], vocab["O"]]]
    save_file(weights, str(other / "model.safetensors"))
    out = export_gguf(other, tmp_path / "m.gguf", "q8_0", adapter_dir=adapter, ignore_base_name=True)
    with pytest.raises(QloraError, match=r"the check of .*m.gguf failed: logits: next-token agreement .*"
                                         r"chat template: .*kept for inspection"):
        check_gguf(out, base, "q8_0", adapter_dir=adapter, data=data, engine="qlora", log=lambda _: None)
    assert not json.loads((tmp_path / "m.check.json").read_text())["passed"]


def test_merge_check_loads_the_merged_model_back(trained, tmp_path, capsys):
    from qlora.cli import main

    _, base, adapter, data = trained
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out),
                 "--dtype", "fp32", "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "merged.check.json").read_text())
    assert report["passed"] and report["logits"]["agreement"] == 1.0 and report["logits"]["mean_kl"] < 1e-6
    assert "merged" in capsys.readouterr().out


def test_cli_export_with_imatrix_ollama_and_check(trained, tmp_path, capsys, monkeypatch):
    from qlora.cli import main

    _, base, adapter, data = trained
    monkeypatch.delenv("QLORA_LLAMA_PYTHON", raising=False)
    args = ["export", "--gguf", "--model", str(base), "--adapter", str(adapter), "--type", "q4_k_m",
            "--imatrix-data", str(data), "--imatrix-samples", "4", "--ollama", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "a.gguf"), "--check", "--check-engine", "qlora"]) == 0
    out = capsys.readouterr()
    assert "importance matrix: 4 examples" in out.err and "passed" in out.out
    assert {p.name for p in tmp_path.iterdir()} == {"a.gguf", "a.Modelfile", "a.check.json"}
    assert main(args + ["--out", str(tmp_path / "a.gguf")]) == 2  # nothing overwritten
    assert "exists" in capsys.readouterr().err
    if find_llama_python() is None:  # the default check: one line on how to get it
        assert main(args + ["--out", str(tmp_path / "b.gguf")]) == 0
        notes = [ln for ln in capsys.readouterr().err.splitlines() if "check skipped" in ln]
        assert len(notes) == 1 and "pip install llama-cpp-python" in notes[0]
        assert not (tmp_path / "b.check.json").exists()
    assert main(["export", "--gguf", "--model", str(base), "--out", str(tmp_path / "c.gguf"), "--type",
                 "f16", "--imatrix-data", str(data), "--no-check"]) == 2
    assert "k-quants only" in capsys.readouterr().err and not (tmp_path / "c.gguf").exists()


def test_a_host_too_small_for_the_reference_is_said_before_the_export(trained, tmp_path, capsys,
                                                                      monkeypatch):
    from qlora.cli import main
    from qlora.export.check import reference_host_bytes
    from qlora.memory import host
    from qlora.models.weights import read_headers

    _, base, adapter, _ = trained
    # the tiny model's whole float32 reference is the smaller (a streamed one's activations at
    # 256 tokens and its 0.5 GiB for the process outweigh its weights): neither fits below it
    needed = reference_host_bytes(read_headers(base), "original", False)
    monkeypatch.setattr(host, "host_available_bytes", lambda: int(needed) - 1)
    args = ["export", "--gguf", "--model", str(base), "--adapter", str(adapter), "--type", "q8_0",
            "--device", "cpu", "--check-engine", "qlora"]
    assert main(args + ["--out", str(tmp_path / "a.gguf"), "--check"]) == 2
    err = capsys.readouterr().err
    assert "--check: the check's reference" in err and "GiB a layer at a time) and" in err
    assert f"about {needed / 2**30:.1f} GiB of host memory (" in err
    assert not list(tmp_path.iterdir())  # refused before any file
    assert main(args + ["--out", str(tmp_path / "b.gguf")]) == 0  # by default: skipped, said once
    assert len([ln for ln in capsys.readouterr().err.splitlines() if "check skipped" in ln]) == 1
    assert {p.name for p in tmp_path.iterdir()} == {"b.gguf"}
    merge = ["merge", "--model", str(base), "--adapter", str(adapter), "--device", "cpu"]
    assert main(merge + ["--out", str(tmp_path / "m1"), "--check"]) == 2  # merge's check alike
    assert "--check: the check's reference" in capsys.readouterr().err
    assert main(merge + ["--out", str(tmp_path / "m2")]) == 0
    assert len([ln for ln in capsys.readouterr().err.splitlines() if "check skipped" in ln]) == 1
    assert {p.name for p in tmp_path.iterdir()} == {"b.gguf", "m2"}
    # an NF4 base's reference keeps its linears at ~0.52 bytes a value: the same host holds it
    assert reference_host_bytes(read_headers(base), "nf4", False) < needed - 1
    assert main(args + ["--out", str(tmp_path / "n.gguf"), "--base", "nf4", "--check"]) == 0
    assert (tmp_path / "n.check.json").exists()
    monkeypatch.setattr(host, "host_available_bytes", lambda: int(needed) + 1)
    assert main(args + ["--out", str(tmp_path / "c.gguf"), "--check"]) == 0  # room: it runs
    assert (tmp_path / "c.check.json").exists()


@pytest.mark.skipif(find_llama_python() is None, reason="llama-cpp-python is not importable here "
                    "(pip install llama-cpp-python, or set QLORA_LLAMA_PYTHON to a python that has it)")
@pytest.mark.parametrize("qtype,target", [("q8_0", 1.0), ("q4_k_m", 0.95)])
def test_gguf_reaches_the_targets_in_llama_cpp(trained, tmp_path, qtype, target):
    _, base, adapter, data = trained
    out = export_gguf(base, tmp_path / "m.gguf", qtype, adapter_dir=adapter)
    report = check_gguf(out, base, qtype, adapter_dir=adapter, data=data, engine="llama.cpp",
                        device="cpu", log=lambda _: None)
    assert report["passed"] and report["logits"]["agreement"] >= target, report["logits"]
    assert report["engine"].startswith("llama.cpp")
    assert report["chat"]["stopped_on"] == 4 and report["chat"]["template_same"]


# --- every other native family -----------------------------------------------------------------
_SLIDING, _FULL = "sliding_attention", "full_attention"
_DENSE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
# each family's tiny model with the settings the export accepts (llama.cpp derives Gemma's layer
# pattern and query scale from the architecture, and caps Gemma 2 always: gguf.gemma_settings);
# Gemma's windows shorter than a conversation (~36 tokens), so the sliding layers' masks matter;
# hidden 256, whose rows fill k-quant blocks (the experts' down projections, 64 wide, fall back
# in q4_k_m to Q5_0, Q8_0 in the use_more_bits layer: llama.cpp's fallback rule as export/
# kquants writes it, compared with llama.cpp's own quantizer only for experts 256 wide)
FAMILY_MODELS = {
    # Mistral's window (4096) past the context: llama.cpp runs it as llama, with no window at all
    # (the export says so where the window is shorter: test_export_gguf.py)
    "mistral": _DENSE,
    "qwen2": _DENSE,
    "qwen3": {**_DENSE, "head_dim": 64},
    "phi3": _DENSE,
    "gemma2": {**_DENSE, "head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 16,
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
               "layer_types": [_SLIDING, _FULL]},
    "gemma3_text": {**_DENSE, "head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 16,
                    "num_hidden_layers": 6, "final_logit_softcapping": None,
                    "layer_types": [_SLIDING] * 5 + [_FULL]},
    "mixtral": {**_DENSE, "intermediate_size": 64},
    "qwen3_moe": {**_DENSE, "moe_intermediate_size": 64, "head_dim": 64},
}
FAMILY_CASES = [pytest.param(family, qtype, target, id=f"{family}-{qtype}")
                for family in FAMILY_MODELS for qtype, target in (("q8_0", 1.0), ("q4_k_m", 0.95))]


@pytest.fixture(scope="module")
def family_trained(request, tmp_path_factory):
    family = request.param
    # the mixtures of experts overshoot at the dense families' rate: at 1e-2 the tiny mixtral's
    # answers still do not end after 24 steps (perplexity 2.7); at 3e-3 its loss is 0.08 nats
    # after 16 steps (qwen3_moe's 0.04)
    lr = 3e-3 if family in ("mixtral", "qwen3_moe") else 1e-2
    return _train(tmp_path_factory.mktemp(family), family, 16, lr=lr, initializer_range=0.05,
                  **FAMILY_MODELS[family])


def _assert_targets(report, target):
    assert report["passed"] and report["logits"]["agreement"] >= target, report["logits"]
    assert report["logits"]["tokens"] == 8 * (len(ANSWER) + 1)  # the answers and <|im_end|>
    assert report["chat"]["template_same"] and report["chat"]["prompt_tokens_same"]
    # the tiny tokenizer's ChatML ends every family's turn with <|im_end|> (id 4)
    assert report["chat"]["stopped_on"] == report["chat"]["reference_stopped_on"] == 4, report["chat"]


@pytest.mark.parametrize("family_trained,qtype,target", FAMILY_CASES, indirect=["family_trained"],
                         scope="module")
def test_every_family_reaches_the_targets_without_llama_cpp(family_trained, tmp_path, qtype, target):
    _, base, adapter, data = family_trained
    out = export_gguf(base, tmp_path / "m.gguf", qtype, adapter_dir=adapter)
    _assert_targets(check_gguf(out, base, qtype, adapter_dir=adapter, data=data, engine="qlora",
                               device="cpu", log=lambda _: None), target)


@pytest.mark.skipif(find_llama_python() is None, reason="llama-cpp-python is not importable here")
@pytest.mark.parametrize("family_trained,qtype,target", FAMILY_CASES, indirect=["family_trained"],
                         scope="module")
def test_every_family_reaches_the_targets_in_llama_cpp(family_trained, tmp_path, qtype, target):
    _, base, adapter, data = family_trained
    out = export_gguf(base, tmp_path / "m.gguf", qtype, adapter_dir=adapter)
    report = check_gguf(out, base, qtype, adapter_dir=adapter, data=data, engine="llama.cpp",
                        device="cpu", log=lambda _: None)
    assert report["engine"].startswith("llama.cpp")
    _assert_targets(report, target)


# --- the importance matrix ----------------------------------------------------------------------
def test_imatrix_is_the_mean_square_of_each_linears_input(trained):
    from qlora.export.imatrix import collect
    from qlora.export.reference import load_reference

    _, base, adapter, _ = trained
    model, _, _ = load_reference(base, adapter, device="cpu")
    seqs = [[1, 20, 30, 40, 50], [1, 60, 70]]
    imatrix, tokens = collect(model, seqs)
    assert tokens == 8 and len(imatrix) == 2 * 7 + 1
    with torch.no_grad():
        layer0 = model.model.layers[0]
        xs = torch.cat([layer0.input_layernorm(model.model.embed_tokens(torch.tensor(s)))
                        for s in seqs])
    want = (xs.double() ** 2).mean(0).float().numpy()
    np.testing.assert_allclose(imatrix["model.layers.0.self_attn.q_proj.weight"], want, rtol=1e-5)
    assert imatrix["model.layers.0.mlp.down_proj.weight"].shape == (512,)
    assert imatrix["lm_head.weight"].shape == (256,)


def test_imatrix_of_a_tied_output_goes_to_the_embedding(tmp_path):
    from qlora.export.imatrix import collect
    from qlora.export.reference import load_reference

    model, _, _ = load_reference(build_tiny_model(tmp_path / "tied", "llama", tie_word_embeddings=True),
                                 None, device="cpu")
    imatrix, _ = collect(model, [[1, 2, 3]])
    assert "lm_head.weight" not in imatrix and imatrix["model.embed_tokens.weight"].shape == (64,)


def test_imatrix_steers_the_exported_k_quants(trained, tmp_path):
    _, base, _, _ = trained
    from safetensors.torch import load_file

    w = load_file(str(base / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"].numpy()
    hot = np.arange(0, 256, 32)
    importance = np.ones(256, dtype=np.float32)
    importance[hot] = 1000.0
    errs = []
    for name, imatrix in (("plain", None), ("steered", {"model.layers.0.mlp.up_proj.weight": importance})):
        out = export_gguf(base, tmp_path / f"{name}.gguf", "q4_k_m", imatrix=imatrix)
        t = next(t for t in gguf.GGUFReader(str(out)).tensors if t.name == "blk.0.ffn_up.weight")
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        errs.append(((got - w)[:, hot] ** 2).mean())
    assert errs[1] < 0.5 * errs[0], errs
    with pytest.raises(QloraError, match="k-quants only"):
        export_gguf(base, tmp_path / "f.gguf", "f16", imatrix={})
