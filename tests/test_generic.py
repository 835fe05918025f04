"""The generic path (models/generic.py) against transformers, peft and bitsandbytes themselves.

Tiny random models of architectures the reference decoder does not implement: gpt2 (Conv1D
layers, weights stored [in, out], tied head, learned positions, dropout inside the model), gemma
(scaled embeddings, RMSNorm of 1 + w, GELU), olmo (LayerNorm without parameters) and granite
(scaled embeddings, residuals and logits). Each is saved by transformers and loaded by our
loader; every comparison is with the other library computing the same thing.

Tolerances: in fp32 both sides compute the same operations in other groupings (a Conv1D's
x @ W against our F.linear on the transposed copy, PEFT's separate LoRA add against our addmm,
transformers' mean loss against our sum), so their results differ by fp32 rounding only: about
1e-7 relative per operation, a few 1e-7 after the layers of a tiny model. 1e-5 leaves room for
that and fails on any real error (a scale, a transposition, a norm or an adapter missed moves the
numbers by 1e-3 and more). The 4-bit comparisons use 1e-4: both sides dequantize the same bytes,
but bitsandbytes' CPU matmul groups its products its own way.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import fp32_bnb_reference
from qlora.adapters import AdapterConfig, LoraLinear, attach_adapters, load_adapter, save_adapter
from qlora.errors import QloraError
from qlora.models import GenericLM, load_model
from qlora.quant import QuantConfig

FP32 = torch.float32
NONE = QuantConfig(method="none", compute_dtype=FP32)
NF4 = QuantConfig(method="nf4", double_quant=True, compute_dtype=FP32)

SIZES = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "gemma": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=256),
    "olmo": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "granite": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    embedding_multiplier=4.0, residual_multiplier=0.5, logits_scaling=2.0),
    # transformers 5 saves its head as "embed_out" and renames it "lm_head" as it loads
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=256),
}


def build_generic(out, model_type: str, seed: int = 0, sizes: dict | None = None):
    """A random transformers `model_type` model with the tiny tokenizer, saved to `out`; its
    sizes SIZES' unless given."""
    from qlora.tiny import build_tiny_generic

    return build_tiny_generic(out, model_type, seed,
                              **(SIZES[model_type] if sizes is None else sizes))


def load_counting_alive(path, quant, monkeypatch, counted, collect: bool = False):
    """(load_model(path, quant), the most tensors whose stored name `counted` accepts that were
    still alive when the loader read another): every read through a spy on generic.read_tensor;
    `collect`: a garbage collection before each count (only references hold them then)."""
    import gc
    import logging
    import weakref

    import qlora.models.generic as generic

    alive: list[weakref.ref] = []
    most = 0
    read = generic.read_tensor

    def spy(handle, file, key):
        nonlocal most
        if collect:
            gc.collect()
        alive[:] = [r for r in alive if r() is not None]
        most = max(most, len(alive))
        tensor = read(handle, file, key)
        if counted(key):
            alive.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(generic, "read_tensor", spy)
    logging.disable(logging.CRITICAL)  # pytest's log records would keep frames (and tensors)
    try:
        return load_model(path, quant), most
    finally:
        logging.disable(logging.NOTSET)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("generic")
    return {t: build_generic(root / t, t, seed=i) for i, t in enumerate(SIZES)}


def hf_model(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=FP32, **kwargs)


def hf_nf4(path):
    """transformers + bitsandbytes' own 4-bit load, computing in fp32."""
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=FP32)
    return fp32_bnb_reference(hf_model(path, device_map="cpu", quantization_config=config))


def rel_err(expected: torch.Tensor, got: torch.Tensor) -> float:
    return float((expected - got).abs().max() / expected.abs().max())


def tokens(seed: int = 0, batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(6, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize_b(model, seed: int = 1) -> None:
    """LoRA B starts at zero; a random B makes the adapter change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


def peft_twin(path, ours, cfg: AdapterConfig, target_modules="all-linear"):
    """transformers + peft with our adapters' weights copied in."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(hf_model(path), LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target_modules,
        use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, task_type="CAUSAL_LM"))
    state = peft_model.state_dict()
    copied = 0
    with torch.no_grad():
        for name, m in ours.named_modules():
            if isinstance(m, LoraLinear):
                for part in ("lora_A", "lora_B"):
                    state[f"base_model.model.{name}.{part}.default.weight"].copy_(
                        getattr(m, part).weight)
                if m.use_dora:
                    state[f"base_model.model.{name}.lora_magnitude_vector.default.weight"].copy_(
                        m.lora_magnitude_vector)
                copied += 1
    assert copied == len([k for k in state if k.endswith("lora_A.default.weight")])
    return peft_model


# --- the model ------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", list(SIZES))
def test_logits_and_names_are_transformers(models, model_type):
    path = models[model_type]
    ours = load_model(path, NONE)
    ref = hf_model(path).eval()
    assert isinstance(ours, GenericLM) and ours.spec.model_type == model_type
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert ours.spec.num_params() == sum(p.numel() for p in ref.parameters())
    ids = tokens()
    with torch.no_grad():
        assert rel_err(ref(ids).logits, ours(ids)) <= 1e-5


def test_loading_streams_one_16bit_linear_weight_at_a_time(models, tmp_path, monkeypatch):
    """A linear's 16-bit weight is quantized and gone before the next tensor is read, shard
    after shard, as on the native path."""
    sharded = tmp_path / "sharded"
    hf_model(models["gemma"]).save_pretrained(str(sharded), max_shard_size="40KB")
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    spec = load_model(models["gemma"], NONE).spec
    linear_weights = {f"{layer.name}.weight" for layer in spec.linears}
    model, most = load_counting_alive(sharded, NF4, monkeypatch, linear_weights.__contains__,
                                      collect=True)
    assert most == 0, f"{most} earlier 16-bit weights were still alive when the next was read"
    assert sum(type(m).__name__ == "Linear4bit" for m in model.modules()) == len(linear_weights)


def test_conv1d_becomes_an_out_by_in_linear(models):
    """GPT-2's Conv1D stores [in, out]; ours holds the [out, in] linear it computes."""
    ours = load_model(models["gpt2"], NONE)
    ref = hf_model(models["gpt2"])
    c_attn = ours.get_submodule("transformer.h.0.attn.c_attn")
    conv = ref.get_submodule("transformer.h.0.attn.c_attn")
    assert type(conv).__name__ == "Conv1D" and conv.weight.shape == (64, 192)
    assert type(c_attn) is torch.nn.Linear and c_attn.weight.shape == (192, 64)
    assert torch.equal(c_attn.weight, conv.weight.t())
    layers = {layer.name: layer for layer in ours.spec.linears}
    assert layers["transformer.h.0.attn.c_attn"].transposed
    assert "lm_head" not in layers  # the head is never quantized nor an adapter target


def test_checkpoint_names_are_renamed_as_transformers_renames_them(models, tmp_path):
    """GPT-NeoX's saved head "embed_out.weight" is the model's "lm_head.weight" (transformers'
    renaming as it loads, run by transformers' own rename_source_key); per-expert weights that
    transformers stacks as it loads (Qwen2-MoE's) keep their own names and are grouped by the 3D
    parameter they make (test_generic_moe.py loads them)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora.models.generic_checkpoint import checkpoint_names, read_plan

    path = models["gpt_neox"]
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "embed_out.weight" in keys  # as transformers 5 writes it
    hf = load_model(path, NONE).hf
    names = checkpoint_names(hf, keys)
    assert names["embed_out.weight"] == "lm_head.weight"
    with pytest.raises(QloraError, match=r"tensors embed_out\.weight and lm_head\.weight both "
                                         r"name the model's lm_head\.weight"):
        checkpoint_names(hf, ["embed_out.weight", "lm_head.weight"])

    config = AutoConfig.for_model("qwen2_moe", vocab_size=128, hidden_size=64,
                                  intermediate_size=128, moe_intermediate_size=32,
                                  shared_expert_intermediate_size=64, num_experts=4,
                                  num_experts_per_tok=2, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config)
    experts = [f"model.layers.0.mlp.experts.{e}.{p}_proj.weight" for e in (1, 0)
               for p in ("up", "gate")]
    plan = read_plan(hf, experts)
    assert plan.names == {k: k for k in experts}
    (target, conversion), = plan.conversions.items()
    assert target == "model.layers.0.mlp.experts.gate_up_proj"
    assert conversion.sources[experts[0]] == "mlp.experts.*.up_proj.weight"
    with pytest.raises(QloraError, match=r"tensor model\.layers\.0\.mlp\.experts\.gate_up_proj "
                                         r"is the model's .* keep one layout of the experts"):
        read_plan(hf, ["model.layers.0.mlp.experts.gate_up_proj", *experts])


def test_transformers_4_renames_by_the_models_own_regex_map(monkeypatch):
    """Without transformers 5's conversion mapping, a model's _checkpoint_conversion_mapping (a
    regex map transformers 4.52-4.57 applies, the first pattern that matches) renames."""
    import sys
    from types import SimpleNamespace

    from qlora.models.generic_checkpoint import transformers_renamer

    monkeypatch.setitem(sys.modules, "transformers.core_model_loading", None)  # ImportError
    hf = SimpleNamespace(_checkpoint_conversion_mapping={
        r"^language_model\.model": "model.language_model", r"^language_model": "model.x"})
    rename = transformers_renamer(hf)
    assert rename("language_model.model.norm.weight") == ("model.language_model.norm.weight", None)
    assert rename("lm_head.weight") == ("lm_head.weight", None)


def test_a_multimodal_gemma3_checkpoint_loads_by_transformers_renamings(tmp_path):
    """Gemma 3's 4B-27B checkpoints are the multimodal model_type gemma3, which transformers 5
    saves under their old names ("language_model.model.embed_tokens.weight") and renames as it
    loads: on the generic path its logits over text are transformers'."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from qlora.tiny import build_tokenizer

    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=256, sliding_window=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          image_token_index=127, boi_token_index=125, eoi_token_index=126)
    torch.manual_seed(0)
    Gemma3ForConditionalGeneration(config).save_pretrained(tmp_path)
    build_tokenizer(tmp_path)
    ours = load_model(tmp_path, NONE)
    assert isinstance(ours, GenericLM) and ours.spec.model_type == "gemma3"
    ids = tokens()
    with torch.no_grad():
        assert rel_err(hf_model(tmp_path)(ids).logits, ours(ids)) <= 1e-5


@pytest.mark.parametrize("model_type", ["gpt2", "gemma"])
def test_nf4_matches_transformers_and_bitsandbytes(models, model_type):
    """The same bytes as transformers + bitsandbytes' own 4-bit load, and the same logits."""
    path = models[model_type]
    ref = hf_nf4(path).eval()
    ours = load_model(path, NF4)
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    quantized = [k for k in ref_state if ref_state[k].dtype == torch.uint8]
    assert len(quantized) >= 8, "transformers quantized nothing"
    assert {k for k in our_state if our_state[k].dtype == torch.uint8} == set(quantized)
    for key in ref_state:
        assert torch.equal(ref_state[key], our_state[key]), f"{key} differs from bitsandbytes'"
    for key in ("lm_head.weight", next(k for k in our_state if "embed" in k or "wte" in k)):
        assert our_state[key].dtype == FP32
    ids = tokens(1)
    with torch.no_grad():
        assert rel_err(ref(ids).logits, ours(ids)) <= 1e-4


# --- adapters against peft ------------------------------------------------------------------------
METHODS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


@pytest.mark.parametrize("model_type,method", [("gpt2", "lora"), ("gpt2", "dora"),
                                               ("gemma", "lora"), ("gemma", "rslora"),
                                               ("olmo", "lora"), ("granite", "dora")])
def test_training_loss_and_gradients_match_peft(models, model_type, method):
    """One training batch in train mode (GPT-2's own dropout included, the same RNG state on both
    sides): the summed loss over the label tokens and every adapter gradient equal PEFT's."""
    path = models[model_type]
    cfg = AdapterConfig(r=4, alpha=8, dropout=0.0, **METHODS[method])
    ours = load_model(path, NONE)
    torch.manual_seed(0)
    attach_adapters(ours, cfg)
    randomize_b(ours)
    theirs = peft_twin(path, ours, cfg)
    ours.train()
    theirs.train()
    ids = tokens(2)
    labels = ids.clone()
    labels[:, :6] = -100
    n_labels = int((labels[:, 1:] != -100).sum())
    torch.manual_seed(7)
    loss_sum = ours(ids, labels=labels)
    torch.manual_seed(7)
    reference = theirs(input_ids=ids, labels=labels).loss
    (loss_sum / n_labels).backward()
    reference.backward()
    mean, expected = float(loss_sum.detach()) / n_labels, float(reference.detach())
    assert abs(mean - expected) <= 1e-5 * expected
    assert_same_adapter_gradients(ours, theirs)


def assert_same_adapter_gradients(ours, theirs) -> None:
    """Every LoRA layer's gradients (A, B and DoRA's magnitude) within 1e-5 of PEFT's twin's
    (fp32, the same products in another order)."""
    compared = 0
    for name, m in ours.named_modules():
        if not isinstance(m, LoraLinear):
            continue
        for part in ("lora_A", "lora_B"):
            expected = theirs.get_parameter(f"base_model.model.{name}.{part}.default.weight").grad
            assert rel_err(expected, getattr(m, part).weight.grad) <= 1e-5, f"{name}.{part}"
            compared += 1
        if m.use_dora:
            expected = theirs.get_parameter(
                f"base_model.model.{name}.lora_magnitude_vector.default.weight").grad
            assert rel_err(expected, m.lora_magnitude_vector.grad) <= 1e-5, name
    assert compared == 2 * len(ours.spec.linears)


def peft_all_linear(path) -> set[str]:
    """The modules PEFT's all-linear wraps on transformers' model of `path`."""
    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(hf_model(path), LoraConfig(
        r=2, lora_alpha=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    return {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
            if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


@pytest.mark.parametrize("model_type", ["gpt2", "gemma"])
def test_all_linear_is_peft_s(models, model_type):
    ours = load_model(models[model_type], NONE)
    wrapped = attach_adapters(ours, AdapterConfig(r=2, alpha=4, dropout=0.0))
    assert sorted(wrapped) == sorted(peft_all_linear(models[model_type]))


@pytest.mark.parametrize("model_type,quant", [("gpt2", "none"), ("gpt2", "nf4"),
                                              ("gemma", "none"), ("olmo", "none"),
                                              ("granite", "none")])
def test_saved_adapter_loads_in_peft_and_peft_s_loads_here(models, tmp_path, model_type, quant):
    from peft import LoraConfig, PeftModel, get_peft_model

    path = models[model_type]
    qc, base = (NF4, hf_nf4) if quant == "nf4" else (NONE, hf_model)
    ours = load_model(path, qc)
    attach_adapters(ours, AdapterConfig(r=4, alpha=8, dropout=0.0))
    randomize_b(ours)
    save_adapter(ours, tmp_path / "ours", str(path))
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    # PEFT writes fan_in_fan_out for a Conv1D target: a merge folds the delta in transposed
    assert saved["fan_in_fan_out"] is (model_type == "gpt2")
    ids = tokens(3)
    ours.eval()
    peft_model = PeftModel.from_pretrained(base(path), tmp_path / "ours").eval()
    with torch.no_grad():
        mine = ours(ids)
        assert rel_err(peft_model(ids).logits, mine) <= (1e-4 if quant == "nf4" else 1e-5)
        assert rel_err(hf_model(path)(ids).logits, mine) > 1e-3  # the adapter changes them

    peft_model = get_peft_model(base(path), LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "peft")
    again = load_model(path, qc)
    load_adapter(again, tmp_path / "peft")
    with torch.no_grad():
        assert rel_err(peft_model.eval()(ids).logits, again.eval()(ids)) <= (
            1e-4 if quant == "nf4" else 1e-5)


def test_target_modules_match_as_peft_matches(models):
    ours = load_model(models["gpt2"], NONE)
    wrapped = attach_adapters(ours, AdapterConfig(r=2, alpha=4, target_modules=["c_attn",
                                                                                  "mlp.c_proj"]))
    assert wrapped == ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj",
                       "transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_proj"]
    with pytest.raises(QloraError, match=r"\['q_proj'\].*'c_attn', 'c_fc', 'c_proj'"):
        attach_adapters(load_model(models["gpt2"], NONE),
                        AdapterConfig(r=2, alpha=4, target_modules=["q_proj"]))


# --- packing, generation --------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["gpt2", "gemma"])
def test_packed_rows_equal_documents_one_by_one(models, model_type):
    model = load_model(models[model_type], NONE)
    assert model.packs_documents  # measured at load: the documents do not see each other
    docs = [tokens(4, 1, 7)[0], tokens(5, 1, 12)[0], tokens(6, 1, 5)[0]]
    separate = []
    for doc in docs:
        labels = doc.clone()
        labels[0] = -100
        with torch.no_grad():
            separate.append(model(doc[None], labels=labels[None]))
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    labels = ids.clone()
    labels[0, [0, 7, 19]] = -100
    with torch.no_grad():
        packed = model(ids, position_ids=positions, labels=labels)
    torch.testing.assert_close(packed, sum(separate), rtol=1e-5, atol=1e-5)


def test_a_model_that_lets_documents_meet_trains_on_padded_rows(data, tmp_path):
    """Mamba's forward takes no position ids, and its state runs along the whole row: packing
    would let a document see the one before. The probe says so; evaluation pads instead, and
    training (packing on, the default) turns packing off, saying so and why."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora.config import load_config
    from qlora.eval import loss_sums
    from qlora.tiny import build_tokenizer
    from qlora.train import train

    torch.manual_seed(0)
    config = AutoConfig.for_model("mamba", hidden_size=32, state_size=8, num_hidden_layers=2,
                                  vocab_size=128, expand=2, conv_kernel=4)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "mamba"))
    build_tokenizer(tmp_path / "mamba")
    model = load_model(tmp_path / "mamba", NONE)
    assert not model.packs_documents
    docs = [{"input_ids": t.tolist(), "labels": [-100] + t.tolist()[1:]}
            for t in (tokens(7, 1, 9)[0], tokens(8, 1, 6)[0])]
    total, n = loss_sums(model, docs, max_len=32, micro_batch=2)
    alone = [float(model(torch.tensor([d["input_ids"]]), labels=torch.tensor([d["labels"]])))
             for d in docs]
    assert n == 8 + 5 and total == pytest.approx(sum(alone), rel=1e-5)

    lines = []
    result = train(load_config(None, dict(
        model=str(tmp_path / "mamba"), data=str(data), output_dir=str(tmp_path / "run"),
        max_steps=1, micro_batch_size=2, device="cpu", max_seq_length=32, quant="nf4",
        optim="adamw_torch")), log=lines.append, progress=False)
    assert result.global_step == 1
    said = [ln for ln in lines if ln.startswith("packing off: ")]
    assert len(said) == 1, lines
    assert "would let packed documents see each other" in said[0]
    assert "each row holds one example, padded" in said[0]
    assert any("dt_proj, out_proj, x_proj: this mamba model reads their weights itself" in ln
               for ln in lines), lines


# (config.json of a tiny model, the mixer's linears whose weight transformers reads itself)
READ_BY_MODEL = {
    "mamba": (dict(hidden_size=32, state_size=8, num_hidden_layers=2, vocab_size=128, expand=2,
                   conv_kernel=4), ["dt_proj", "out_proj", "x_proj"]),
    "jamba": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128, mamba_d_state=8,
                   mamba_expand=2, mamba_dt_rank=4, num_experts=2, num_experts_per_tok=1,
                   attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                   expert_layer_offset=1, use_mamba_kernels=False), ["dt_proj"]),
}


@pytest.mark.parametrize("model_type", list(READ_BY_MODEL))
def test_layers_whose_weight_the_model_reads_stay_whole_and_unadapted(tmp_path, model_type):
    """transformers' Mamba mixer reads x_proj's, dt_proj's and out_proj's weight itself (Jamba's
    dt_proj's: its torch path multiplies by dt_proj.weight): a 4-bit weight there is packed
    bytes (the step failed with a shape error), an adapter there skipped. They load in the
    compute dtype, bit for bit the checkpoint's; all-linear (ours and the planner's) leaves them
    out, naming one is refused by both."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora.memory.generic import generic_targets
    from qlora.tiny import build_tokenizer

    sizes, read = READ_BY_MODEL[model_type]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **sizes)).save_pretrained(
        str(tmp_path / model_type))
    build_tokenizer(tmp_path / model_type)
    model = load_model(tmp_path / model_type, QuantConfig(method="nf4", compute_dtype=FP32))
    saved = load_file(str(tmp_path / model_type / "model.safetensors"))
    kept = [layer.name for layer in model.spec.linears if layer.weight_read_by_model]
    assert sorted({name.rsplit(".", 1)[-1] for name in kept}) == read
    for name in kept:
        assert type(model.hf.get_submodule(name)) is nn.Linear
        assert torch.equal(model.hf.get_submodule(name).weight, saved[name + ".weight"])
    in_proj = next(layer.name for layer in model.spec.linears if layer.name.endswith("in_proj"))
    assert type(model.hf.get_submodule(in_proj)) is not nn.Linear  # bitsandbytes' 4-bit layer
    wrapped = attach_adapters(model, AdapterConfig(r=4, alpha=8))
    planned = [layer.name for layer in generic_targets(model.spec, "all-linear")]
    assert sorted(wrapped) == sorted(planned) and not set(kept) & set(wrapped)
    assert model(tokens(6, 1)).isfinite().all()
    with pytest.raises(QloraError, match=rf"\['{read[0]}'\].*reads their weights itself"):
        attach_adapters(load_model(tmp_path / model_type, NONE),
                        AdapterConfig(r=4, alpha=8, target_modules=["in_proj", read[0]]))
    with pytest.raises(QloraError, match=rf"--targets: {read[0]}: .*reads their weights itself"):
        generic_targets(model.spec, ["in_proj", read[0]])


@pytest.mark.parametrize("model_type", ["gpt2", "gemma"])
def test_greedy_generation_matches_transformers(models, model_type):
    from qlora.infer import GenerationOptions, generate

    path = models[model_type]
    prompt = [5, 40, 41, 42, 43, 44]
    ours = load_model(path, NONE)
    got = generate(ours, prompt, GenerationOptions(max_new_tokens=12))
    out = hf_model(path).eval().generate(torch.tensor([prompt]), max_new_tokens=12,
                                         do_sample=False, eos_token_id=None, pad_token_id=0)
    assert got == out[0, len(prompt):].tolist()


# --- the commands ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = [{"prompt": f"{w} = ", "completion": w.upper()}
            for w in ("cat", "dog", "sun", "moon", "tree", "fish", "bird", "rain", "snow", "wind")]
    path = tmp_path_factory.mktemp("data") / "words.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_qlora_train_on_gpt2_end_to_end(models, data, tmp_path, capsys):
    from peft import PeftModel

    from qlora.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--model", str(models["gpt2"]), "--data", str(data), "--output_dir",
               str(out), "--max_steps", "3", "--micro_batch_size", "2",
               "--gradient_accumulation_steps", "1", "--learning_rate", "1e-2", "--device", "cpu",
               "--max_seq_length", "128", "--val_set_size", "2", "--save_steps", "2",
               "--logging_steps", "1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "generic path" in captured.out and "no CUDA graphs" in captured.out
    for name in ("adapter_config.json", "adapter_model.safetensors", "summary.json"):
        assert (out / name).is_file(), name
    checkpoint = out / "checkpoints" / "step-00000002"
    assert (checkpoint / "adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 3 and summary["final_eval_loss"] is not None
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ids = tokens(9, 1, 16)
    ours = load_model(models["gpt2"], NF4)
    load_adapter(ours, out)
    peft_model = PeftModel.from_pretrained(hf_model(models["gpt2"]), str(out)).eval()
    with torch.no_grad():
        # transformers' 16-bit base under the adapter trained over NF4: close, not equal
        assert rel_err(peft_model(ids).logits, ours.eval()(ids)) < 0.1


def test_resume_on_the_generic_path_is_exact(models, data, tmp_path):
    """Dropout on the generic path draws from the global RNG (LoRA's and GPT-2's own), which a
    checkpoint saves and torch's checkpointing replays: a run cut after one step and resumed
    makes the same steps as one run straight through."""
    from qlora.config import load_config
    from qlora.train import train

    def config(out, **extra):
        return load_config(None, dict(
            model=str(models["gpt2"]), data=str(data), output_dir=str(out), max_steps=3,
            micro_batch_size=2, gradient_accumulation_steps=1, learning_rate=1e-2,
            device="cpu", max_seq_length=128, quant="none", optim="adamw_torch",
            gradient_checkpointing=True, lora_dropout=0.1, logging_steps=1, **extra))

    quiet = lambda *_: None  # noqa: E731
    straight = train(config(tmp_path / "a"), log=quiet, progress=False)
    cut = train(config(tmp_path / "b"), log=quiet, progress=False, stop_after_steps=1)
    assert cut.stopped == "interrupted" and cut.global_step == 1
    resumed = train(config(tmp_path / "b", resume="latest"), log=quiet, progress=False)
    assert resumed.global_step == 3
    assert resumed.step_losses == {k: straight.step_losses[k] for k in (2, 3)}
    # ... and they trained: gradients reached the adapters through transformers' checkpointing
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert all(t.abs().max() > 0 for k, t in saved.items() if "lora_B" in k)


def test_merge_folds_into_conv1d_weights_transposed(models, tmp_path):
    """The merged checkpoint (16-bit, transformers' layout: c_attn still [in, out]) gives the
    logits of transformers + peft with the adapter; with --base nf4, each Conv1D weight is the
    transpose of the dequantized NF4 layer our model trains on, plus the adapter."""
    from qlora.merge import merge_adapter
    from qlora.quant import dequantize_weight

    path = models["gpt2"]
    ours, merged = merged_random_adapter(path, NF4, tmp_path)
    assert_merged_is_peft_s(path, merged, tmp_path / "adapter", tokens(10))

    on_nf4 = hf_model(merge_adapter(path, tmp_path / "adapter", tmp_path / "merged-nf4",
                                    dtype="float32", base="nf4"))
    layer = ours.get_submodule("transformer.h.1.mlp.c_fc")
    expected = dequantize_weight(layer.base_layer).float() + layer.delta_weight()
    got = on_nf4.get_submodule("transformer.h.1.mlp.c_fc").weight.detach()
    assert got.shape == (64, 256)
    torch.testing.assert_close(got.t(), expected, rtol=0, atol=1e-6)


def merged_random_adapter(path, quant, tmp_path):
    """(our model of `path` with a random all-linear adapter, saved in tmp_path/adapter, the
    fp32 checkpoint merge_adapter makes of it in tmp_path/merged)."""
    from qlora.merge import merge_adapter

    ours = load_model(path, quant)
    attach_adapters(ours, AdapterConfig(r=4, alpha=8, dropout=0.0))
    randomize_b(ours)
    save_adapter(ours, tmp_path / "adapter", str(path))
    return ours, merge_adapter(path, tmp_path / "adapter", tmp_path / "merged", dtype="float32")


def assert_merged_is_peft_s(path, merged, adapter, ids) -> None:
    """The merged checkpoint's logits are transformers + peft's with the adapter: fp32, the
    same products added in another order (1e-5)."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(hf_model(path), adapter).eval()
    with torch.no_grad():
        assert rel_err(peft_model(ids).logits, hf_model(merged).eval()(ids).logits) <= 1e-5


def headless_copy(path, out):
    """`path`'s checkpoint as GPT2Model.save_pretrained writes one: its tensors named without the
    LM model's "transformer." prefix ("h.0.attn.c_attn.weight"), the rest of the folder as is."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(path, out)
    state = load_file(str(out / "model.safetensors"))
    save_file({k.removeprefix("transformer."): t for k, t in state.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_merge_folds_a_checkpoint_whose_file_names_are_not_the_models(models, tmp_path):
    """A GPT-2 checkpoint saved without the head's prefix: the adapter names the module
    transformer.h.0.attn.c_attn, the file h.0.attn.c_attn.weight. Merge.tensor takes the file's
    name (as GGUF export's reader and merge's writer both give it) and folds the model's module
    there, transposed as the Conv1D stores it: PEFT's merge_and_unload, value for value."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from qlora.merge import merge_adapter, prepare_merge

    base = headless_copy(models["gpt2"], tmp_path / "headless" / "gpt2")  # the name the adapter records
    peft_model = get_peft_model(hf_model(models["gpt2"]), LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", fan_in_fan_out=True))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: make the adapter change the weights
                p.normal_(0, 0.05)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    expected = peft_model.merge_and_unload().state_dict()

    stored = load_file(str(base / "model.safetensors"))
    merge = prepare_merge(base, tmp_path / "adapter", "float32")
    # fp32 on both sides, the same W + scale · B @ A in another grouping: a few fp32 roundings
    for key in ("h.0.attn.c_attn.weight", "h.1.mlp.c_proj.weight", "wte.weight"):
        got = merge.tensor(key, lambda: stored[key])
        torch.testing.assert_close(got, expected["transformer." + key], rtol=0, atol=1e-6)
    assert not torch.equal(expected["transformer.h.0.attn.c_attn.weight"],
                           stored["h.0.attn.c_attn.weight"])  # the adapter does change it

    merged = load_file(str(merge_adapter(base, tmp_path / "adapter", tmp_path / "merged",
                                         dtype="float32") / "model.safetensors"))
    assert set(merged) == set(expected) - {"lm_head.weight"}  # tied: the head is not stored
    for name, t in merged.items():
        torch.testing.assert_close(t, expected[name], rtol=0, atol=1e-6)


def test_merge_refuses_a_trained_copy_of_a_tied_embedding(models, tmp_path):
    """GPT-2's head is its embedding (transformer.wte): an adapter with a trained copy of it
    would change the head too, refused as for a native family's embed_tokens."""
    from peft import LoraConfig, get_peft_model

    from qlora.errors import QloraError
    from qlora.merge import merge_adapter

    get_peft_model(hf_model(models["gpt2"]), LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, modules_to_save=["wte"])
    ).save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(QloraError, match=r"changes transformer\.wte of a model with tied embeddings"):
        merge_adapter(models["gpt2"], tmp_path / "adapter", tmp_path / "out", dtype="float32")
    assert not (tmp_path / "out").exists()


def test_gguf_export_refuses_naming_the_architecture(tmp_path, capsys):
    """An architecture the GGUF writer has no table for (tests/test_generic_gguf.py has those
    it writes) is refused before anything but config.json is read: Phi (phi-1, phi-2)."""
    from transformers import AutoConfig

    from qlora.cli import main

    AutoConfig.for_model("phi", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, architectures=["PhiForCausalLM"]
                         ).save_pretrained(str(tmp_path / "phi"))
    rc = main(["export", "--gguf", "--model", str(tmp_path / "phi"), "--out",
               str(tmp_path / "m.gguf")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "config.json" in err and "'phi'" in err and "PhiForCausalLM" in err
    assert "generic path" in err and "qlora merge" in err
    assert not (tmp_path / "m.gguf").exists()


def test_plan_is_a_coarser_estimate_that_counts_the_weights_exactly(models, capsys):
    """`qlora plan` on a generic model says it is coarser; its weights are the bytes our loaded
    4-bit model holds (bitsandbytes' packed codes and quant states, the rest in 16 bits)."""
    from qlora import memory
    from qlora.cli import main

    assert main(["plan", "--model", str(models["gpt2"]), "--gpu-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "coarser" in out and "generic path" in out and "fits on" in out
    spec = memory.resolve_arch(model_dir=str(models["gpt2"]))
    b = memory.plan(spec, memory.PlanConfig(alloc_rounding=False, nonquant_dtype="fp32"))
    assert b.base + b.embeddings + b.norms == held_bytes(load_model(models["gpt2"], NF4))


def held_bytes(model) -> int:
    """The bytes a loaded model holds: its parameters and its 4-bit layers' quantization
    states (absmax, code, offset and the double quantization's)."""
    import bitsandbytes as bnb

    held = sum(p.numel() * p.element_size() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            state = m.weight.quant_state
            held += sum(t.numel() * t.element_size() for t in (
                state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code))
    return held


def with_config(src, dst, **changes):
    """A copy of the model directory `src` at `dst`, its config.json with `changes`."""
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **changes}))
    return dst


def test_remote_code_only_models_are_refused_and_never_run(models, tmp_path):
    repo = with_config(models["gemma"], tmp_path / "custom", model_type="my_custom_lm", auto_map={
        "AutoConfig": "modeling_custom.Config", "AutoModelForCausalLM": "modeling_custom.Model"})
    marker = tmp_path / "executed"
    (repo / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(QloraError, match="my_custom_lm.*remote code"):
        load_model(repo, NONE)
    assert not marker.exists()
    config = json.loads((repo / "config.json").read_text())
    del config["auto_map"]
    (repo / "config.json").write_text(json.dumps(config))
    with pytest.raises(QloraError, match="my_custom_lm.*not known to transformers"):
        load_model(repo, NONE)
