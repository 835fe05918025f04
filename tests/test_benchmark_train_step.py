"""benchmarks/train_step.py: its FLOP count uses the right parameter counts, and its harness runs.

The GPU numbers themselves come from the device (docs/BENCHMARKS.md); here, on the CPU, we check
the parts that would silently skew them: the parameter counts behind MFU (against transformers and
peft themselves) and that the subprocess harness produces comparable records for two systems.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "train_step.py"


def _bench():
    spec = importlib.util.spec_from_file_location("train_step", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("model_type,tied,extra", [
    ("llama", False, {}), ("qwen2", True, {}),
    ("gemma2", True, {"head_dim": 24}),  # a head_dim unlike hidden / heads (16)
    ("phi3", False, {"pad_token_id": 0}),  # fused qkv_proj, gate_up_proj: one LoRA A each
])
def test_flop_parameter_counts_match_transformers_and_peft(model_type, tied, extra):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    bench = _bench()
    shape = dict(model_type=model_type, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                 num_attention_heads=6, num_key_value_heads=2, vocab_size=300, tie_word_embeddings=tied,
                 **extra)
    cfg = AutoConfig.for_model(**shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    targets = bench.lora_targets(shape)
    n_lin = sum(m.weight.numel() for name, m in model.named_modules()
                if name.rsplit(".", 1)[-1] in targets)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=targets))
    n_lora = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)

    fl = bench.step_flops(shape, seq=64, mb=2, ckpt=True, r=8)
    assert fl["n_lin"] == n_lin
    assert fl["n_head"] == model.get_output_embeddings().weight.numel()
    assert fl["n_lora"] == n_lora
    # checkpointing adds exactly one forward of the layers (dense, LoRA, attention), never of the head
    off = bench.step_flops(shape, seq=64, mb=2, ckpt=False, r=8)
    t = 128
    assert fl["dense"] - off["dense"] == 2 * n_lin * t
    assert fl["lora"] - off["lora"] == 2 * n_lora * t
    assert fl["attn"] / off["attn"] == pytest.approx(4 / 3)


def test_family_shapes_build_the_configs_each_system_reads():
    """The families' benchmark shapes are the planner's named shapes (real config.json values),
    and the configs the harness writes from them read back in transformers as those models: the
    values qlora, transformers + peft and Unsloth then all load from config.json."""
    from transformers import AutoConfig

    from qlora.models.spec import NAMED_SHAPES

    bench = _bench()
    for name in ("gemma-2-9b", "phi-4", "mistral-nemo-12b", "gemma-3-1b", "stablelm-2-1.6b"):
        shape = dict(bench.SHAPES[name])
        assert shape == NAMED_SHAPES[name]
        cfg = AutoConfig.for_model(**shape)
        assert (cfg.hidden_size, cfg.num_hidden_layers) == (shape["hidden_size"], shape["num_hidden_layers"])
    gemma = AutoConfig.for_model(**bench.SHAPES["gemma-2-9b"])
    assert (gemma.head_dim, gemma.attn_logit_softcapping, gemma.final_logit_softcapping) == (256, 50.0, 30.0)
    assert gemma.layer_types[:2] == ["sliding_attention", "full_attention"] and gemma.sliding_window == 4096
    assert bench.hf_attention(bench.SHAPES["gemma-2-9b"], "auto") == "eager"
    assert bench.hf_attention(bench.SHAPES["phi-4"], "auto") == "sdpa"
    assert bench.lora_targets(bench.SHAPES["phi-4"]) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    gemma3 = AutoConfig.for_model(**bench.SHAPES["gemma-3-1b"])
    assert gemma3.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]


def test_harness_runs_two_systems_on_the_same_data(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--shapes", "tiny-llama", "--seqs", "32",
           "--systems", "hf,qlora", "--steps", "3", "--warmup", "1", "--no-qlora-ckpt-off",
           "--model-root", str(tmp_path / "models"), "--out", str(out)]
    # timeout: stops a hung run only, never a slow one (a loaded machine may take many minutes)
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=3600)
    recs = {r["system"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert set(recs) == {"hf", "qlora"}
    for r in recs.values():
        assert "error" not in r, r.get("error")
        assert len(r["losses"]) == 3 and r["tokens_per_s"] > 0
    # same random checkpoint and token ids, LoRA B = 0 at the start: the first losses agree, which
    # also checks that ours (a sum of token losses) is divided into a mean as transformers' is
    # (hf runs unquantized on the CPU, ours NF4, hence the tolerance)
    assert recs["hf"]["loss_first"] == pytest.approx(recs["qlora"]["loss_first"], abs=0.05)
    assert json.loads((out / "env.json").read_text())["packages"]["torch"]


def test_harness_runs_qlora_with_offload_and_plans_auto_choices(tmp_path):
    """The long-context configuration's options, on the CPU in one run (each run is three
    processes): offload on, recorded with the step; MLP tiles and kept attention `auto`, planned
    for a GPU size: the tiny model fits 1 GB with every layer's attention kept and no tiles."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--shapes", "tiny-llama", "--seqs", "32",
           "--systems", "qlora", "--steps", "2", "--warmup", "1", "--no-qlora-ckpt-off",
           "--no-gpu-busy", "--model-root", str(tmp_path / "models"), "--offload-activations", "true",
           "--tile-mlp", "auto", "--keep-attention", "auto", "--plan-gpu-memory", "1GB",
           "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=3600)
    rec = json.loads((out / "results.jsonl").read_text())
    assert "error" not in rec, rec.get("error")
    assert (rec["offload_activations"], rec["tile_mlp"], rec["keep_attention"]) == (True, False, True)
    assert rec["planned_for_gib"] == 1.0 and rec["planned_peak_alloc_gib"] > 0
    assert len(rec["losses"]) == 2


def test_harness_refuses_an_unknown_system_before_building_anything(tmp_path, capsys):
    """A misspelt --systems name stops the run before a checkpoint is written (on the GPU machine
    that write and the other systems would cost minutes before the name failed in its worker)."""
    argv = ["--device", "cpu", "--shapes", "tiny-llama", "--seqs", "32", "--model-root",
            str(tmp_path / "models"), "--out", str(tmp_path / "out")]
    assert _bench().main(argv + ["--systems", "qlora,unsloth-no-compile"]) == 2
    assert "unknown unsloth-no-compile" in capsys.readouterr().err
    assert not (tmp_path / "models").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("system,at_import", [("unsloth", "1"), ("unsloth-nocompile", "0")])
def test_unsloth_nocompile_turns_the_layer_compile_off_before_unsloth_is_imported(
        tmp_path, monkeypatch, system, at_import):
    """Unsloth reads UNSLOTH_BLOCK_COMPILE when it wraps each decoder layer in torch.compile
    (unsloth/models/_block_compile.py): "unsloth-nocompile" sets it to 0 in its worker before
    the import, "unsloth" leaves it as found. A stand-in unsloth package records the variable as
    its import sees it (the real one needs a GPU) and stops the load."""
    stub = tmp_path / "site" / "unsloth"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text(
        "import os\n"
        "AT_IMPORT = os.environ.get('UNSLOTH_BLOCK_COMPILE')\n"
        "class FastLanguageModel:\n"
        "    @staticmethod\n"
        "    def from_pretrained(**kwargs):\n"
        "        raise LookupError('stand-in')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "unsloth", raising=False)
    for name in ("UNSLOTH_BLOCK_COMPILE", "UNSLOTH_DISABLE_STATISTICS", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")  # restored after the test, whatever the worker set
    bench = _bench()
    args = bench.parse_args(["--device", "cpu", "--shapes", "tiny-llama", "--seqs", "32"])
    try:
        with pytest.raises(LookupError, match="stand-in"):
            bench.setup_system(system, str(tmp_path / "model"), args)
        assert sys.modules["unsloth"].AT_IMPORT == at_import
    finally:
        sys.modules.pop("unsloth", None)


def test_report_compares_tokens_per_second_and_gpu_time_with_the_seeds_stack():
    """benchmarks/report.py: × hf from tokens/s (host waits included), and from GPU time per step
    (gpu_busy_ms, host waits left out); a failed system keeps its row, with every column."""
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    common = dict(shape="llama-3-8b", seq=2048, ckpt=True, peak_alloc_gib=1.0, peak_reserved_gib=1.0,
                  mfu=0.5, loss_first=12.5, loss_last=12.4, steps=10)
    recs = [dict(common, system="hf", tokens_per_s=1000.0, step_s_median=2.048, gpu_busy_ms=400.0),
            dict(common, system="qlora", tokens_per_s=3000.0, step_s_median=0.683, gpu_busy_ms=160.0),
            dict(common, system="qlora-nokeep", tokens_per_s=2000.0, step_s_median=1.024),
            dict(common, system="unsloth-nocompile", tokens_per_s=1500.0, step_s_median=1.365),
            dict(system="unsloth", shape="llama-3-8b", seq=2048, ckpt=True, error="timed out")]
    rows = {line.split("|")[4].strip(): line.split("|")[1:-1]
            for line in report.table(recs).splitlines()[2:]}
    header = report.table(recs).splitlines()[0].split("|")[1:-1]
    assert all(len(cells) == len(header) for cells in rows.values())
    col = {name.strip(): i for i, name in enumerate(header)}
    assert rows["qlora"][col["× hf"]].strip() == "3.00"
    assert rows["qlora"][col["× hf, GPU time"]].strip() == "2.50"
    assert rows["qlora-nokeep"][col["× hf, GPU time"]].strip() == "—"  # no GPU time recorded
    assert rows["unsloth-nocompile"][col["× hf"]].strip() == "1.50"  # a row of its own, beside unsloth
    assert "failed: timed out" in rows["unsloth"][-1]


def _preference_bench():
    spec = importlib.util.spec_from_file_location("preference_step",
                                                  ROOT / "benchmarks" / "preference_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _preference_records(bench, tmp_path, method: str) -> tuple[dict, list]:
    """TRL's and our worker's records for `method` on the tiny shape on the CPU (in this process:
    the subprocess harness is train_step.py's, tested above), and the pairs of the first step."""
    model_dir = tmp_path / "tiny-llama"
    bench.ts.make_model_dir("tiny-llama", model_dir, "cpu")
    results = tmp_path / "results.jsonl"
    argv = ["--device", "cpu", "--prompt", "6", "--completion", "5", "--pairs", "2", "--steps", "2",
            "--warmup", "1", "--method", method, "--worker", "--shape", "tiny-llama",
            "--model-dir", str(model_dir), "--results", str(results)]
    for system in ("trl", "qlora"):
        assert bench.worker(bench.parse_args(argv + ["--system", system])) == 0
    recs = {r["system"]: r for r in map(json.loads, results.read_text().splitlines())}
    assert set(recs) == {"trl", "qlora"}
    for r in recs.values():
        assert "error" not in r, r.get("traceback", r.get("error"))
        assert len(r["losses"]) == 2 and r["examples_per_s"] > 0
        assert r["method"] == method
        assert r["tokens_per_step"] == 2 * (2 * 6 + 5 + 5)  # both sequences of both pairs
    assert recs["qlora"]["layout"] == "padded"  # the CPU has no flash varlen attention
    args = bench.parse_args(argv + ["--system", "qlora"])
    return recs, bench.make_pairs(args, 1, bench.ts.SHAPES["tiny-llama"]["vocab_size"])[0]


def test_preference_step_runs_dpo_for_trl_and_qlora_on_the_same_pairs(tmp_path):
    """TRL's DPOTrainer and ours step the same pairs, and the first step's loss is log 2 for both
    (LoRA B starts at 0, so the policy is the reference, the adapter-off base, on both sides)."""
    import math

    recs, _ = _preference_records(_preference_bench(), tmp_path, "dpo")
    for r in recs.values():
        # DPO sigmoid at a zero margin is -log sigmoid(0); fp32 on the CPU, B = 0 exactly
        assert r["loss_first"] == pytest.approx(math.log(2), abs=1e-5)


def test_preference_step_without_checkpointing_takes_the_same_steps_a_pair_at_a_time(tmp_path):
    """`qlora-nockpt` (no checkpointing, one pair a forward, the step's pairs accumulated) makes
    the update `qlora` makes from the same pairs (dropout 0: its masks are drawn per forward, so
    two forwards draw others than one): their losses agree step after step. fp32 on the
    CPU: the first step's loss is log 2 on both (B = 0); the ones after an update differ only by
    the order of fp32 sums (the gradient summed over two backward passes, not within one), which
    moves each AdamW update by far less than its lr (1e-2) and the loss by less than 1e-5 (the
    records keep 5 decimals), where a pair left out or taken twice turns the updates' directions
    (dropping the last pair moved the losses by 0.24). AdamW and clipping do not see the
    gradient's scale, so the gradients' norms before clipping are compared too: fp32 sums of
    the same terms in two groupings, 1e-5 relative (a micro-batch scaled by 1 instead of 1/3
    would triple them).
    KTO is refused: splitting its micro-batch changes its KL estimate."""
    import math

    bench = _preference_bench()
    model_dir = tmp_path / "tiny-llama"
    bench.ts.make_model_dir("tiny-llama", model_dir, "cpu")
    results = tmp_path / "results.jsonl"
    argv = ["--device", "cpu", "--prompt", "6", "--completion", "5", "--pairs", "3", "--steps", "3",
            "--warmup", "1", "--lr", "1e-2", "--lora-dropout", "0", "--worker", "--shape", "tiny-llama",
            "--model-dir", str(model_dir), "--results", str(results)]
    for system in ("qlora", "qlora-nockpt"):
        assert bench.worker(bench.parse_args(argv + ["--system", system])) == 0
    bench.worker(bench.parse_args(argv + ["--system", "qlora-nockpt", "--method", "kto"]))
    recs = [json.loads(line) for line in results.read_text().splitlines()]
    whole, split, kto = recs
    assert "error" not in whole and "error" not in split, split.get("traceback")
    assert whole["losses"][0] == pytest.approx(math.log(2), abs=1e-5)
    assert split["losses"] == pytest.approx(whole["losses"], abs=1e-5)
    assert split["grad_norms"] == pytest.approx(whole["grad_norms"], rel=1e-5)
    assert all(n > 0 for n in whole["grad_norms"])
    assert whole["losses"][2] != pytest.approx(whole["losses"][0], abs=1e-3)  # the steps moved it
    assert "pair methods only" in kto["error"]


def test_preference_step_runs_kto_for_trl_and_qlora_on_the_same_examples(tmp_path):
    """--method kto steps TRL's KTOTrainer and ours on the same unpaired examples; at the first
    step LoRA B is 0, so the policy is the reference (the adapter-off base, both sides) and z = 0:
    every example's loss is 1 - sigmoid(0) = 1/2 (weights 1). And the KL sequences TRL's collator
    makes of the harness's rows (its _prepare_dataset's rotation) are the ones qlora's batch
    holds: prompt i with example i - 1's completion."""
    import math

    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    from qlora.data.preference import half, preference_batch

    bench = _preference_bench()
    recs, examples = _preference_records(bench, tmp_path, "kto")
    for r in recs.values():
        assert r["tokens_per_step"] == 2 * 2 * (6 + 5)  # each example's sequence and its KL one
        # fp32 on the CPU and B = 0 exactly: z is 0 and each loss 1/2 up to roundings (the
        # records keep 5 decimals); the second step's loss, after an update, finite
        assert r["loss_first"] == pytest.approx(0.5, abs=1e-6)
        assert math.isfinite(r["loss_last"])
    trl_batch = DataCollatorForUnpairedPreference(pad_token_id=0)(bench.kto_rows(None)(examples))
    ours = half(preference_batch(examples, 0), second=True)
    assert torch.equal(trl_batch["KL_input_ids"], ours["input_ids"])
    assert [e["prompt"] + examples[k - 1]["completion"] for k, e in enumerate(examples)] \
        == trl_batch["KL_input_ids"].tolist()


def test_preference_step_kto_rows_rotate_completions_as_trls_dataset_does(tmp_path):
    """The harness hands TRL's collator rows it builds itself (our ids skip TRL's tokenizing): their
    KL completions are the ones TRL's own KTOTrainer._prepare_dataset gives the same examples (run
    here on text rows through a word-level tokenizer; `self` stands in with the four attributes
    it reads, so no model is built)."""
    from types import SimpleNamespace

    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import KTOTrainer

    bench = _preference_bench()
    bench.ts._write_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    texts = [("a b", " c"), ("d", " e f"), ("g h i", " j"), ("k", " l m n")]  # unequal lengths
    rows = [{"prompt": p, "completion": c, "label": k % 2 == 0} for k, (p, c) in enumerate(texts)]
    trainer = SimpleNamespace(_tokenizer=tok, calculate_KL=True, desirable_weight=1.0,
                              undesirable_weight=1.0)
    config = SimpleNamespace(dataset_num_proc=None, max_length=None,
                             per_device_train_batch_size=len(rows))
    trl_rows = list(KTOTrainer._prepare_dataset(trainer, Dataset.from_list(rows), tok, config,
                                                "train"))
    examples = [{"prompt": r["prompt_ids"], "completion": r["completion_ids"], "label": r["label"]}
                for r in trl_rows]
    ours = bench.kto_rows(None)(examples)
    assert [r["KL_completion_ids"] for r in ours] == [r["KL_completion_ids"] for r in trl_rows]
    assert len({tuple(r["KL_completion_ids"]) for r in ours}) == 4  # a rotation, not a copy


def test_preference_step_runs_orpo_for_trl_and_qlora_on_the_same_pairs(tmp_path):
    """TRL's ORPOTrainer and ours step the same pairs; at the first step LoRA B is 0, so both are
    the base model, and each first loss is ORPO's of the base's own log-probs (transformers'
    logits of the checkpoint, fp64 from here on), beta 0.1:

        loss = NLL - beta * mean_pairs log sigmoid(log odds(chosen) - log odds(rejected))

    with each completion's log-prob the mean over its tokens (both sides), and the NLL the token
    mean over the batch's chosen sequences: over prompt and completion in TRL (its
    concatenated_forward; the authors' code, xfactlab/orpo, by default), over the completion only
    in ours (methods/orpo.py; the authors' --disable_prompt_loss). The two differ by that much
    and by nothing else: the odds-ratio terms agree."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    bench = _preference_bench()
    recs, pairs = _preference_records(bench, tmp_path, "orpo")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "tiny-llama"), dtype=torch.float32)
    prompt = len(pairs[0]["prompt"])

    def token_logps(pair, part):  # each label token's log-prob, prompt[1:] then the completion
        ids = torch.tensor([pair["prompt"] + pair[part]])
        with torch.no_grad():
            logits = hf(ids).logits[0, :-1].double()
        return logits.log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]

    chosen = [token_logps(p, "chosen") for p in pairs]
    mean = {part: torch.stack([token_logps(p, part)[prompt - 1:].mean() for p in pairs])
            for part in ("chosen", "rejected")}

    def log_odds(logp):  # log p - log(1 - p)
        return logp - torch.log(-torch.expm1(logp))

    ratio = F.logsigmoid(log_odds(mean["chosen"]) - log_odds(mean["rejected"])).mean()
    nll_with_prompt = -torch.cat(chosen).mean()
    nll_completion = -torch.cat([t[prompt - 1:] for t in chosen]).mean()
    # the records round losses to 5 decimals (5e-6); fp32 log-softmax over 512 logits of a loss
    # near log 512 = 6.2 carries a few ulps (5e-7 each) per token, averaged: 2e-5 bounds both,
    # while the two NLLs differ by about 5e-2 on this model (asserted, so the check can tell)
    assert abs(float(nll_with_prompt - nll_completion)) > 1e-3
    assert recs["trl"]["loss_first"] == pytest.approx(float(nll_with_prompt - 0.1 * ratio), abs=2e-5)
    assert recs["qlora"]["loss_first"] == pytest.approx(float(nll_completion - 0.1 * ratio), abs=2e-5)


def test_gemm_floor_counts_the_base_gemms_of_train_steps_flop_formula():
    """gemm_floor.py's base-GEMM FLOPs against train_step.py's published formula (`dense` of
    step_flops: the projections and the head, forward and input gradient, plus the recompute):
    for an SFT step they differ by exactly what the floor knows the step skips, each layer's
    down projection in the recompute (and q/k/v too with attention kept) and layer 0's q/k/v
    input gradient; without the recompute by layer 0's alone. Integers: equal, not close. And a
    DPO step is the SFT count of its tokens plus one more forward (the reference) of the layers
    and the head over the completions."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        gemm_floor = importlib.import_module("gemm_floor")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    for name in ("llama-3-8b", "phi-4", "qwen2.5-1.5b"):
        shape = gemm_floor.SHAPES[name]
        h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
        _, qkv_out, qkv_in = gemm_floor.projections(shape)[0]
        tokens = gemm_floor.STEPS["sft"][0]
        published = _bench().step_flops(shape, tokens, 1, ckpt=True)["dense"]
        qkv0 = 2 * tokens * qkv_out * qkv_in
        down_rerun = layers * 2 * tokens * h * i
        assert gemm_floor.base_gemm_flops(shape, "sft", True, attention_kept=False) \
            == published - down_rerun - qkv0
        assert gemm_floor.base_gemm_flops(shape, "sft", True, attention_kept=True) \
            == published - down_rerun - qkv0 - layers * qkv0
        no_rerun = _bench().step_flops(shape, tokens, 1, ckpt=False)["dense"]
        assert gemm_floor.base_gemm_flops(shape, "sft", False) == no_rerun - qkv0
    shape = gemm_floor.SHAPES["llama-3-8b"]
    tokens, head_tokens = gemm_floor.STEPS["dpo"][:2]
    layer = sum(2 * tokens * o * k for _, o, k in gemm_floor.projections(shape))
    head = 2 * head_tokens * shape["vocab_size"] * shape["hidden_size"]
    assert gemm_floor.base_gemm_flops(shape, "dpo", False) \
        == gemm_floor.base_gemm_flops(shape, "orpo", False) + shape["num_hidden_layers"] * layer + head
