"""The run configuration: defaults, YAML + overrides, and the refusals (before anything loads)."""

import pytest
import yaml

from qlora.config import (CONFIG_FILE_NAME, RunConfig, load_config, parse_cli_overrides,
                          save_config)
from qlora.errors import QloraError

BASE = {"model": "m", "data": "d.jsonl"}


def test_defaults_are_the_qlora_recipe():
    cfg = RunConfig()
    assert (cfg.quant, cfg.double_quant) == ("nf4", True)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (16, 32, 0.05)
    assert cfg.target_modules == ["all-linear"]
    assert (cfg.learning_rate, cfg.lr_scheduler_type, cfg.warmup_ratio) == (2e-4, "cosine", 0.03)
    assert (cfg.max_grad_norm, cfg.optim) == (0.3, "paged_adamw_8bit")


def test_yaml_then_command_line(tmp_path):
    f = tmp_path / "run.yaml"
    # `2e-4` without a dot is a string to PyYAML; it must still be read as a number
    f.write_text("model: m\ndata: d.jsonl\nlearning_rate: 2e-4\nlora:\n  r: 64\n  lora_alpha: 16\n"
                 "per_device_train_batch_size: 2\ntarget_modules: [q_proj, v_proj]\nbf16: true\n")
    cfg = load_config(f, parse_cli_overrides(["--lora_alpha", "32", "--packing=false",
                                              "--use-dora", "--max_steps", "10"]))
    assert cfg.learning_rate == 2e-4 and isinstance(cfg.learning_rate, float)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.micro_batch_size) == (64, 32, 2)
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert (cfg.packing, cfg.use_dora, cfg.max_steps, cfg.dtype) == (False, True, 10, "bfloat16")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, dict(BASE, learning_rate="1e-4", target_modules="q_proj,k_proj"))
    save_config(cfg, tmp_path / CONFIG_FILE_NAME, extra={"device": "cpu"})
    again = load_config(tmp_path / CONFIG_FILE_NAME)
    assert again == cfg
    assert yaml.safe_load((tmp_path / CONFIG_FILE_NAME).read_text())["learning_rate"] == 1e-4


@pytest.mark.parametrize("overrides, needles", [
    ({"learnin_rate": "1e-4"}, ["learnin_rate", "did you mean `learning_rate`"]),
    ({"lr_scheduler_type": "cosin"}, ["lr_scheduler_type", "'cosin'", "cosine, linear, constant"]),
    ({"optim": "adam"}, ["optim", "'adam'", "paged_adamw_8bit", "adamw_torch"]),
    ({"quant": "nf3"}, ["quant", "'nf3'", "nf4, fp4, int8, none"]),
    ({"micro_batch_size": "two"}, ["micro_batch_size", "'two'", "integer"]),
    ({"lora_dropout": "1.5"}, ["lora_dropout", "1.5", "< 1"]),
    ({"learning_rate": "0"}, ["learning_rate", "> 0"]),
    ({"packing": "maybe"}, ["packing", "'maybe'", "true or false"]),
    ({"bf16": "true", "fp16": "true"}, ["bf16", "fp16"]),
    ({"resume": "latest", "overwrite": "true"}, ["resume", "overwrite"]),
    ({"keep_attention": "some"}, ["keep_attention", "'some'", "true, false or a number of layers"]),
    ({"keep_attention": "-2"}, ["keep_attention", "'-2'", "0 or more"]),
    ({"keep_attention": 2.5}, ["keep_attention", "2.5", "number of layers"]),
])
def test_bad_values_are_refused_with_key_value_and_allowed(overrides, needles):
    with pytest.raises(QloraError) as err:
        load_config(None, dict(BASE, **overrides))
    for needle in needles:
        assert needle in str(err.value)


@pytest.mark.parametrize("value, want", [
    ("true", True), ("on", True), (True, True), ("false", False), (False, False), ("0", 0),
    ("1", 1), (1, 1), ("12", 12), (12.0, 12), ("none", None),
])
def test_keep_attention_is_a_flag_or_a_number_of_layers(value, want):
    """`1` is one layer, not true: the number is read as a count wherever it is written."""
    got = load_config(None, dict(BASE, keep_attention=value)).keep_attention
    assert got == want and type(got) is type(want)


def test_keep_attention_past_the_model_s_layers_is_refused_with_the_count():
    from qlora.models.spec import last_layers

    assert [last_layers(k, 32) for k in (True, False, None, 0, 5, 32)] == [32, 0, 0, 0, 5, 32]
    with pytest.raises(QloraError, match="keep_attention.*40 layers.*has 32.*at most 32"):
        last_layers(40, 32)


def test_bad_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model: m\ndata: d\nlearning_rate: [1\n")
    with pytest.raises(QloraError, match=r"run\.yaml line \d+"):
        load_config(f)
    f.write_text("model: m\ndata: d\nwarmup_ratios: 0.1\n")
    with pytest.raises(QloraError, match=r"`warmup_ratios` in .*run\.yaml.*`warmup_ratio`"):
        load_config(f)


def test_model_and_data_required():
    with pytest.raises(QloraError, match="--model"):
        load_config(None, {"data": "d"})
    with pytest.raises(QloraError, match="--data"):
        load_config(None, {"model": "m"})


def test_example_configs_load_and_match_the_seeds():
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "examples"
    guide = load_config(examples / "guide-llama2-7b-alpaca.yaml")
    assert (guide.lora_r, guide.lora_alpha, guide.micro_batch_size,
            guide.gradient_accumulation_steps, guide.num_train_epochs) == (64, 16, 1, 8, 3)
    notebook = load_config(examples / "notebook-qwen2.5-1.5b-alpaca.yaml")
    assert (notebook.lora_r, notebook.lora_alpha, notebook.micro_batch_size,
            notebook.gradient_accumulation_steps, notebook.max_grad_norm,
            notebook.weight_decay, notebook.max_seq_length) == (16, 32, 2, 8, 0.3, 0.001, 1024)
    for cfg in (guide, notebook):
        assert (cfg.optim, cfg.lr_scheduler_type, cfg.warmup_ratio, cfg.learning_rate) == (
            "paged_adamw_8bit", "cosine", 0.03, 2e-4)


def test_saved_config_resumes_a_run_that_was_started_with_overwrite(tmp_path):
    cfg = load_config(None, {"model": "m", "data": "d.jsonl", "output_dir": str(tmp_path),
                             "overwrite": True})
    save_config(cfg, tmp_path / CONFIG_FILE_NAME)
    # what `qlora train` tells a user to run after Ctrl-C
    resumed = load_config(tmp_path / CONFIG_FILE_NAME, {"resume": "latest"})
    assert resumed.resume == "latest" and resumed.overwrite is False
    assert resumed.model == "m" and resumed.learning_rate == cfg.learning_rate


SEEDS_NOTEBOOK_KEYS = """
max_seq_length: 1024
dataset_text_field: text
packing: true
dataset_num_proc: 4
per_device_train_batch_size: 2
per_device_eval_batch_size: 2
gradient_accumulation_steps: 8
optim: paged_adamw_8bit
learning_rate: 2.0e-4
weight_decay: 0.001
max_grad_norm: 0.3
adam_beta1: 0.9
adam_beta2: 0.999
adam_epsilon: 1.0e-8
num_train_epochs: 1
lr_scheduler_type: cosine
warmup_ratio: 0.03
bf16: true
fp16: false
gradient_checkpointing: true
gradient_checkpointing_kwargs: {use_reentrant: false}
save_strategy: steps
save_steps: 200
save_total_limit: 3
load_best_model_at_end: true
eval_strategy: steps
eval_steps: 200
logging_steps: 10
logging_first_step: true
report_to: none
seed: 42
r: 16
lora_alpha: 32
lora_dropout: 0.05
bias: none
task_type: CAUSAL_LM
target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
use_dora: false
use_rslora: false
load_in_4bit: true
bnb_4bit_quant_type: nf4
bnb_4bit_use_double_quant: true
bnb_4bit_compute_dtype: bfloat16
"""


def test_the_seeds_config_keys_load_as_they_are(tmp_path):
    path = tmp_path / "seeds.yaml"
    path.write_text(SEEDS_NOTEBOOK_KEYS)
    cfg = load_config(path, {"model": "m", "data": "d.jsonl"})
    assert (cfg.micro_batch_size, cfg.eval_batch_size, cfg.gradient_accumulation_steps) == (2, 2, 8)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.quant, cfg.double_quant) == (16, 32, "nf4", True)
    assert cfg.dtype == "bfloat16" and cfg.load_best_at_end and cfg.data_format == "text"
    assert cfg.max_grad_norm == 0.3 and cfg.warmup_ratio == 0.03 and not cfg.tensorboard


@pytest.mark.parametrize("line, needle", [("bias: all", "`bias`"),
                                          ("task_type: SEQ_CLS", "`task_type`"),
                                          ("save_strategy: epoch", "`save_strategy`")])
def test_stack_keys_with_values_we_do_not_do_are_refused(tmp_path, line, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(line + "\n")
    with pytest.raises(QloraError, match=needle):
        load_config(path, {"model": "m", "data": "d.jsonl"})
