"""Adapters against peft: files, logits, loss and gradients, in both directions."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import fp32_bnb_reference
from qlora.adapters import AdapterConfig, attach_adapters, load_adapter, save_adapter, trainable_summary
from qlora.errors import QloraError
from qlora.models import load_model
from qlora.quant import QuantConfig

FP32 = torch.float32
METHODS = {
    "lora": dict(use_rslora=False, use_dora=False),
    "rslora": dict(use_rslora=True, use_dora=False),
    "dora": dict(use_rslora=False, use_dora=True),
}


def hf_base(path, quant: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if quant != "none":
        kwargs = dict(quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=FP32), device_map="cpu")
    return fp32_bnb_reference(AutoModelForCausalLM.from_pretrained(str(path), dtype=FP32, **kwargs).eval())


def randomize_adapters(model: torch.nn.Module, seed: int) -> None:
    """B starts at zero, which would make every comparison trivially pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / a.abs().max())


def batch():
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(6, 128, (2, 24), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100
    return ids, labels


@pytest.mark.parametrize("quant", ["none", "nf4"])
@pytest.mark.parametrize("method", list(METHODS))
def test_our_adapter_loads_in_peft_with_same_logits(llama_dir, tmp_path, method, quant):
    from peft import PeftModel

    ours = load_model(llama_dir, QuantConfig(method=quant, compute_dtype=FP32))
    cfg = AdapterConfig(r=8, alpha=16, dropout=0.0, **METHODS[method])
    wrapped = attach_adapters(ours, cfg)
    assert len(wrapped) == 2 * 7
    randomize_adapters(ours, 1)
    save_adapter(ours, tmp_path / "adapter", str(llama_dir))
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    peft_model = PeftModel.from_pretrained(hf_base(llama_dir, quant), tmp_path / "adapter").eval()
    ids, _ = batch()
    with torch.no_grad():
        assert rel_err(peft_model(ids).logits, ours(ids)) <= 1e-4


@pytest.mark.parametrize("variant", ["mistral-window", "qwen2", "qwen3"])
def test_adapters_interchange_with_peft_on_each_dense_family(tiny_models, tmp_path, variant):
    """Both ways on the families beside llama (qwen2's q/k/v biases, qwen3's q/k norms, a
    mistral window): our NF4 adapter in PEFT over transformers + bitsandbytes, and PEFT's here."""
    from peft import LoraConfig, PeftModel, get_peft_model

    path = tiny_models[variant]
    ours = load_model(path, QuantConfig(method="nf4", compute_dtype=FP32))
    attach_adapters(ours, AdapterConfig(r=8, alpha=16, dropout=0.0))
    randomize_adapters(ours, 3)
    save_adapter(ours, tmp_path / "ours", str(path))
    ids, _ = batch()
    peft_model = PeftModel.from_pretrained(hf_base(path, "nf4"), tmp_path / "ours").eval()
    with torch.no_grad():
        assert rel_err(peft_model(ids).logits, ours(ids)) <= 1e-4

    theirs = get_peft_model(hf_base(path, "nf4"), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "o_proj", "up_proj"]))
    randomize_adapters(theirs, 4)
    theirs.save_pretrained(tmp_path / "peft")
    here = load_model(path, QuantConfig(method="nf4", compute_dtype=FP32))
    load_adapter(here, tmp_path / "peft")
    with torch.no_grad():
        assert rel_err(theirs.eval()(ids).logits, here(ids)) <= 1e-4


@pytest.mark.parametrize("method", list(METHODS))
def test_peft_adapter_loads_here_with_same_logits(llama_dir, tmp_path, method):
    from peft import LoraConfig, get_peft_model

    peft_cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                          target_modules=["q_proj", "v_proj", "down_proj"], **METHODS[method])
    peft_model = get_peft_model(hf_base(llama_dir, "nf4"), peft_cfg)
    randomize_adapters(peft_model, 2)
    peft_model.save_pretrained(tmp_path / "peft-adapter")
    ours = load_model(llama_dir, QuantConfig(method="nf4", compute_dtype=FP32))
    load_adapter(ours, tmp_path / "peft-adapter")
    ids, _ = batch()
    with torch.no_grad():
        assert rel_err(peft_model.eval()(ids).logits, ours(ids)) <= 1e-4


def test_saved_keys_and_config_are_peft_s(llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(hf_base(llama_dir, "none"), LoraConfig(
        r=8, lora_alpha=16, target_modules=targets, use_dora=True, task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "peft")
    ours = load_model(llama_dir, QuantConfig(method="none", compute_dtype=FP32))
    attach_adapters(ours, AdapterConfig(r=8, alpha=16, use_dora=True))
    save_adapter(ours, tmp_path / "ours", str(llama_dir))

    def keys(d):
        with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    assert keys(tmp_path / "ours") == keys(tmp_path / "peft")
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key in ("peft_type", "task_type", "r", "lora_alpha", "use_dora", "use_rslora", "bias"):
        assert ours_cfg[key] == peft_cfg[key], key
    assert sorted(ours_cfg["target_modules"]) == sorted(peft_cfg["target_modules"])


@pytest.mark.parametrize("method", list(METHODS))
def test_loss_and_adapter_gradients_match_peft(llama_dir, method):
    from peft import LoraConfig, get_peft_model

    peft_cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                          target_modules="all-linear", **METHODS[method])
    peft_model = get_peft_model(hf_base(llama_dir, "nf4"), peft_cfg)
    randomize_adapters(peft_model, 3)
    ours = load_model(llama_dir, QuantConfig(method="nf4", compute_dtype=FP32))
    attach_adapters(ours, AdapterConfig(r=8, alpha=16, dropout=0.0, **METHODS[method]))
    peft_params = {n.replace("base_model.model.", "").replace(".default", "")
                   .replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): p
                   for n, p in peft_model.named_parameters() if p.requires_grad}
    ours_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert sorted(peft_params) == sorted(ours_params)
    with torch.no_grad():
        for name, p in ours_params.items():
            p.copy_(peft_params[name])
    ids, labels = batch()
    peft_model.train()
    ours.train()
    ref_loss = peft_model(input_ids=ids, labels=labels).loss
    ref_loss.backward()
    n_tokens = int((labels[:, 1:] != -100).sum())
    loss = ours(ids, labels=labels) / n_tokens
    loss.backward()
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() <= 1e-4
    for name, p in ours_params.items():
        assert rel_err(peft_params[name].grad, p.grad) <= 1e-4, name


def test_gradient_checkpointing_gives_the_same_gradients(llama_dir):
    ours = load_model(llama_dir, QuantConfig(method="nf4", compute_dtype=FP32))
    attach_adapters(ours, AdapterConfig(r=4, alpha=8, dropout=0.0))
    randomize_adapters(ours, 4)
    ids, labels = batch()
    ours.train()
    grads = []
    for flag in (False, True):
        ours.gradient_checkpointing = flag
        ours.zero_grad()
        ours(ids, labels=labels).backward()
        grads.append([p.grad.clone() for p in ours.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_trainable_summary_counts_like_peft(llama_dir):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(hf_base(llama_dir, "nf4"), LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable, total = peft_model.get_nb_trainable_parameters()
    ours = load_model(llama_dir, QuantConfig(method="nf4", compute_dtype=FP32))
    attach_adapters(ours, AdapterConfig(r=8, alpha=16))
    line = trainable_summary(ours)
    assert f"trainable params: {trainable:,}" in line
    assert f"all params: {total:,}" in line


def test_missing_target_module_is_named(llama_dir):
    ours = load_model(llama_dir, QuantConfig(method="none", compute_dtype=FP32))
    with pytest.raises(QloraError, match=r"\['qkv_proj'\].*do not exist.*q_proj"):
        attach_adapters(ours, AdapterConfig(target_modules=["q_proj", "qkv_proj"]))


def test_adapter_for_another_model_is_refused(tiny_models, tmp_path):
    small = load_model(tiny_models["llama"], QuantConfig(method="none", compute_dtype=FP32))
    attach_adapters(small, AdapterConfig(r=4, alpha=8))
    save_adapter(small, tmp_path / "a", "llama")
    from qlora.tiny import build_tiny_model

    wider = build_tiny_model(tmp_path / "wider", "llama", intermediate_size=96)
    other = load_model(wider, QuantConfig(method="none", compute_dtype=FP32))
    # same module names, other MLP width: the shapes give it away
    with pytest.raises(QloraError, match="another base model"):
        load_adapter(other, tmp_path / "a")


def test_dora_inference_scale_is_reused_until_the_adapter_changes(llama_dir):
    ours = load_model(llama_dir, QuantConfig(method="nf4", compute_dtype=FP32))
    attach_adapters(ours, AdapterConfig(r=4, alpha=8, dropout=0.05, use_dora=True))
    randomize_adapters(ours, 6)
    ids, labels = batch()
    ours.eval()
    with torch.no_grad():
        first = ours(ids)
    layer = ours.model.layers[0].self_attn.q_proj
    cached = layer._scale_cache[1]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), first)
        assert layer._scale_cache[1] is cached  # nothing recomputed
        layer.lora_B.weight.add_(0.1)  # an in-place change, as an optimizer step makes
        changed = ours(ids)
    assert layer._scale_cache[1] is not cached
    ours.train()
    for m in ours.modules():  # the training-path formula, without dropout, must agree
        if hasattr(m, "lora_dropout"):
            m.lora_dropout = torch.nn.Identity()
    torch.testing.assert_close(ours(ids), changed, rtol=1e-5, atol=1e-5)


def test_saved_adapter_files_have_ordinary_modes(llama_dir, tmp_path):
    """Both files of a saved adapter read as 0644 under umask 022, as any other output: the
    weights too, which safetensors writes 0600."""
    import os
    import stat

    ours = load_model(llama_dir, QuantConfig(method="none", compute_dtype=FP32))
    attach_adapters(ours, AdapterConfig(r=4, alpha=8))
    old = os.umask(0o022)
    try:
        out = save_adapter(ours, tmp_path / "adapter", str(llama_dir))
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == {"adapter_config.json": 0o644, "adapter_model.safetensors": 0o644}
