"""The memory planner: exact where the CPU can check it (bitsandbytes bytes, PEFT's parameter
count), and the CLI, advice and auto-fit behaviour. GPU calibration is benchmarks/measure_memory.py."""

from dataclasses import replace

import pytest
import torch

from qlora import memory
from qlora.cli import main
from qlora.memory import GiB, PlanConfig, arch_from_config, plan
from qlora.tiny import tiny_config

# Odd sizes: n is not a multiple of the block, blocks are more than 256 (several nested absmax).
ODD = dict(hidden_size=72, intermediate_size=1000, num_attention_heads=4, num_key_value_heads=2)


def _bnb_base_bytes(config, quant_type: str, double_quant: bool) -> int:
    """Quantize every decoder linear of `config` with bitsandbytes and count what it keeps."""
    import bitsandbytes.functional as F

    arch = arch_from_config(config.to_dict())
    total = 0
    torch.manual_seed(0)
    for name, n_in, n_out in arch.linears():
        w = torch.randn(n_out, n_in, dtype=torch.bfloat16)
        packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
        tensors = [packed, state.absmax, state.code]
        if double_quant:
            tensors += [state.offset, state.state2.absmax, state.state2.code]
        total += sum(t.numel() * t.element_size() for t in tensors)
        if arch.qkv_bias and name in ("q_proj", "k_proj", "v_proj"):
            total += torch.zeros(n_out, dtype=torch.bfloat16).nbytes
    return total * config.num_hidden_layers


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_4bit_base_equals_bitsandbytes_bytes(family, quant_type, double_quant):
    config = tiny_config(family, **ODD)
    arch = arch_from_config(config.to_dict())
    cfg = PlanConfig(quant=quant_type, double_quant=double_quant, alloc_rounding=False)
    assert plan(arch, cfg).base == _bnb_base_bytes(config, quant_type, double_quant)


def test_int8_base_equals_bitsandbytes_bytes():
    import bitsandbytes.functional as F

    config = tiny_config("llama", **ODD)
    arch = arch_from_config(config.to_dict())
    expected = 0
    for _, n_in, n_out in arch.linears():
        cb, scb, _ = F.int8_vectorwise_quant(torch.randn(n_out, n_in, dtype=torch.float16))
        expected += cb.nbytes + scb.nbytes
    got = plan(arch, PlanConfig(quant="int8", alloc_rounding=False)).base
    assert got == expected * config.num_hidden_layers


def test_double_quant_saves_what_bitsandbytes_saves():
    config = tiny_config("llama", **ODD)
    arch = arch_from_config(config.to_dict())
    saved = plan(arch, PlanConfig(double_quant=False, alloc_rounding=False)).base - \
        plan(arch, PlanConfig(double_quant=True, alloc_rounding=False)).base
    assert saved == _bnb_base_bytes(config, "nf4", False) - _bnb_base_bytes(config, "nf4", True) > 0


@pytest.mark.parametrize("family,targets,dora", [
    ("llama", "all-linear", False),
    ("qwen2", "all-linear", True),
    ("qwen3", ["q_proj", "v_proj"], False),
    ("mistral", ["o_proj", "down_proj", "gate_proj"], True),
])
def test_adapter_params_equal_peft(family, targets, dora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **ODD)
    model = AutoModelForCausalLM.from_config(config)
    base_params = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, use_dora=dora))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    arch = arch_from_config(config.to_dict())
    cfg = PlanConfig(r=8, targets=targets if isinstance(targets, str) else tuple(targets), dora=dora)
    assert memory.adapter_param_count(arch, cfg) == trainable
    assert plan(arch, cfg).adapter_params == trainable
    # and the architecture's own size agrees with the model's
    assert arch.num_params() == base_params


def test_named_shapes_have_their_real_sizes():
    # published parameter counts of the models these shapes copy
    for name, billions in [("qwen2.5-1.5b", 1.54), ("llama-3-8b", 8.03), ("llama-2-7b", 6.74),
                           ("llama-2-13b", 13.02), ("llama-2-70b", 68.98), ("qwen2.5-7b", 7.62),
                           ("mistral-7b", 7.24)]:
        assert memory.resolve_arch(shape=name).num_params() / 1e9 == pytest.approx(billions, abs=0.01), name


def test_cli_prints_table_and_answers_fits(capsys):
    assert main(["plan", "--shape", "llama-3-8b", "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    for part in ("4-bit base (nf4, double quant)", "16-bit embeddings + lm_head", "adapter gradients",
                 "optimizer states", "activations", "workspace", "peak allocated", "fits on"):
        assert part in out
    assert "does NOT fit" not in out


def test_cli_reads_a_model_dir_and_says_what_to_change(tmp_path, capsys):
    tiny_config("qwen2", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                num_attention_heads=16, num_key_value_heads=4, vocab_size=32000).to_json_file(tmp_path / "config.json")
    rc = main(["plan", "--model", str(tmp_path), "--gpu-memory", "6GB", "--no-checkpointing",
               "--micro-batch", "8", "--seq-len", "4096"])
    out = capsys.readouterr().out
    assert rc == 0 and "does NOT fit" in out and "fits with" in out


@pytest.mark.parametrize("argv,message", [
    (["--shape", "gpt-5"], "--shape 'gpt-5' is not known"),
    (["--shape", "llama-3-8b", "--quant", "nf3"], "--quant 'nf3' is not valid"),
    (["--shape", "llama-3-8b", "--optimizer", "sgd"], "--optimizer 'sgd' is not valid"),
    (["--shape", "llama-3-8b", "--targets", "q_proj,lm_head"], "--targets: lm_head not known"),
    (["--shape", "llama-3-8b", "--gpu-memory", "big"], "--gpu-memory 'big' is not a size"),
    (["--shape", "llama-3-8b", "--micro-batch", "0"], "--micro-batch must be a positive"),
    (["--shape", "llama-3-8b", "--sharding", "zero3"], "--sharding 'zero3' is not valid"),
    (["--model", "/nonexistent/model"], "/nonexistent/model/config.json does not exist"),
])
def test_cli_refuses_bad_options(argv, message, capsys):
    assert main(["plan", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_cli_refuses_an_unsupported_family(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_embd": 768}')
    assert main(["plan", "--config-json", str(tmp_path / "config.json")]) == 2
    assert "model_type 'gpt2' is not supported" in capsys.readouterr().err


def test_advise_returns_changes_that_fit():
    arch = memory.resolve_arch(shape="llama-3-8b")
    cfg = PlanConfig(seq_len=1024, micro_batch=4, checkpointing=False)
    gpu = 24 * GiB
    assert not memory.fits(plan(arch, cfg), gpu)
    advice = memory.advise(arch, cfg, gpu)
    assert advice and all(a.changes for a in advice)
    for a in advice:
        assert memory.fits(plan(arch, replace(cfg, **a.changes)), gpu), a.text
    # tried in order: a smaller micro-batch first; here checkpointing alone also fits
    assert set(advice[0].changes) == {"micro_batch"}
    assert any(set(a.changes) == {"checkpointing"} for a in advice)
    assert memory.advise(arch, PlanConfig(), 80 * GiB) == []


def test_advise_combines_when_no_single_change_fits():
    arch = memory.resolve_arch(shape="llama-2-13b")
    cfg = PlanConfig(seq_len=8192, micro_batch=4, checkpointing=False)
    gpu = 12 * GiB
    (a,) = memory.advise(arch, cfg, gpu)
    assert len(a.changes) >= 2 and memory.fits(plan(arch, replace(cfg, **a.changes)), gpu)
    (never,) = memory.advise(memory.resolve_arch(shape="llama-2-70b"), cfg, gpu)
    assert never.changes == {} and "does not fit" in never.text


def test_auto_fit_picks_the_largest_micro_batch():
    arch = memory.resolve_arch(shape="qwen2.5-1.5b")
    for gpu_gib in (8, 24, 80):
        gpu = gpu_gib * GiB
        best = memory.auto_fit(arch, PlanConfig(seq_len=2048), gpu)
        assert best is not None and memory.fits(plan(arch, best), gpu)
        bigger = replace(best, micro_batch=best.micro_batch + 1)
        assert best.micro_batch == 64 or not memory.fits(plan(arch, bigger), gpu)
        if not best.checkpointing:  # off was chosen only because it fits
            assert memory.fits(plan(arch, replace(best, micro_batch=1)), gpu)
        else:
            assert not memory.fits(plan(arch, replace(best, micro_batch=1, checkpointing=False)), gpu)
    assert memory.auto_fit(memory.resolve_arch(shape="llama-2-70b"), PlanConfig(), 16 * GiB) is None


def test_parse_size():
    assert memory.parse_size("24GB") == memory.parse_size("24 GiB") == 24 * GiB
    assert memory.parse_size("16000MiB") == 16000 * 1024**2
    with pytest.raises(memory.QloraError):
        memory.parse_size("-3GB")
