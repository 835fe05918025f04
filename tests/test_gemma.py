"""Gemma 2 and Gemma 3 (text) against transformers, bitsandbytes and peft, and on the fast path.

The tiny models (tiny.py, gemma2.py / gemma3.py's TINY_SIZES) have a sliding window of 8 tokens,
sequences here are longer, and every other layer is full: a wrong window, RoPE base or layer
kind changes the logits. Their soft-caps (5.0) act on the scores and logits (a missing cap moves
the logits by 1e-2 to 1e-1 of their largest), query_pre_attn_scalar is not head_dim, and the
norms are perturbed away from their (1 + 0) identity.

fp32 logits are compared at rel <= 1e-5 (max |a - b| / max |a|): both sides run the same ops in
the same order in fp32 (Gemma 2's capped scores as transformers' eager attention computes them,
SDPA for Gemma 3 on both sides), so what remains is the summation order inside a matmul or
attention kernel, around 1e-7 of the largest logit; a missing cap, norm offset, scale or window
is 1e-3 or more. NF4 and adapters follow the tolerances of test_model.py / test_adapters.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import GEMMA3_SCALED_ROPE, fp32_bnb_reference, reference_attention
from qlora.adapters import AdapterConfig, attach_adapters, load_adapter, save_adapter
from qlora.errors import QloraError
from qlora.models import load_model
from qlora.models.families import gemma2, gemma3
from qlora.models.families.gemma import GemmaLM, GemmaRMSNorm, gemma_settings
from qlora.models.spec import read_spec, spec_from_config
from qlora.quant import QuantConfig
from qlora.speed import SpeedPlan, apply_speed, fast_decoder, grouped_modules

import test_step_parts  # noqa: E402
from test_grouped_fast_path import tiny_family_model  # noqa: E402

FP32 = torch.float32
GEMMAS = ["gemma2", "gemma3", "gemma3-scaled-rope"]


def hf_model(path, quant: str = "none"):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = reference_attention(path)
    if quant != "none":
        kwargs.update(device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=FP32))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=FP32, **kwargs)
    return fp32_bnb_reference(model.eval())


def ours(path, quant: str = "none"):
    return load_model(path, QuantConfig(method=quant, compute_dtype=FP32))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def tokens(seed: int, batch: int = 2, length: int = 40) -> torch.Tensor:
    return torch.randint(6, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


# --- the math against transformers ----------------------------------------------------------------

def test_gemma2_caps_the_scores_as_transformers_eager_attention_does(tiny_models):
    """transformers' default (sdpa) attention drops Gemma 2's score cap; its eager one, the
    reference here, applies it. Ours equals eager and differs from sdpa: the cap acts."""
    from transformers import AutoModelForCausalLM

    path = tiny_models["gemma2"]
    ids = tokens(0)
    sdpa = AutoModelForCausalLM.from_pretrained(str(path), dtype=FP32, attn_implementation="sdpa")
    with torch.no_grad():
        got, eager, uncapped = ours(path)(ids), hf_model(path)(ids).logits, sdpa.eval()(ids).logits
    assert rel_err(eager, got) <= 1e-5
    assert rel_err(uncapped, got) > 1e-3
    assert float(got.abs().max()) < 5.0  # the final cap: |logits| < final_logit_softcapping


def test_layer_windows_and_rope_bases_are_transformers(tiny_models):
    from transformers import AutoConfig

    for name in GEMMAS:
        path = tiny_models[name]
        config = AutoConfig.from_pretrained(str(path))
        settings = gemma_settings(read_spec(path))
        kinds = ["sliding_attention" if w else "full_attention" for w in settings.layer_windows]
        assert kinds == config.layer_types == ["sliding_attention", "full_attention"], name
        assert set(settings.layer_windows) == {config.sliding_window, None}
        assert settings.query_scale == config.query_pre_attn_scalar ** -0.5
    model = ours(tiny_models["gemma3-scaled-rope"])
    rotary = model.model.rotary_emb
    assert float(rotary.local.inv_freq[1]) == pytest.approx(1e4 ** (-2 / 32))
    assert float(rotary.full.inv_freq[1]) == pytest.approx(1e6 ** (-2 / 32) / 8)


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_nf4_bytes_and_logits_match_bitsandbytes(tiny_models, variant):
    path = tiny_models[variant]
    ref, model = hf_model(path, "nf4"), ours(path, "nf4")
    ref_state, our_state = ref.state_dict(), model.state_dict()
    quantized = [k for k in ref_state if k.endswith("_proj.weight") or ".weight." in k]
    assert len(quantized) > 14
    for key in quantized:
        assert torch.equal(ref_state[key], our_state[key]), key
    with torch.no_grad():
        assert rel_err(ref(tokens(1)).logits, model(tokens(1))) <= 1e-4


@pytest.mark.parametrize("variant", ["gemma2", "gemma3", "gemma3-scaled-rope"])
def test_loss_is_transformers_cross_entropy_of_the_capped_logits(tiny_models, variant):
    path = tiny_models[variant]
    ids = tokens(2)
    labels = ids.clone()
    labels[:, :5] = -100
    n_tokens = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        want = hf_model(path)(input_ids=ids, labels=labels).loss
        model = ours(path)
        got = model(ids, labels=labels) / n_tokens
        model.final_softcap = None  # the same loss of uncapped logits is another number
        uncapped = model(ids, labels=labels) / n_tokens
    assert abs(float(got - want)) / float(want) <= 1e-5
    if variant != "gemma3-scaled-rope":  # the one without final_logit_softcapping
        assert abs(float(uncapped - want)) / float(want) > 1e-3


def test_norm_and_embedding_scale_round_as_transformers_in_bf16():
    """Gemma's RMSNorm rounds once, after the (1 + w) scale; the embedding scale is rounded to
    the compute dtype first (sqrt(64) = 8 is exact: 72 is not, in bf16)."""
    from transformers.models.gemma2.modeling_gemma2 import (Gemma2RMSNorm,
                                                            Gemma2TextScaledWordEmbedding)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 72, generator=g).to(torch.bfloat16)
    weight = torch.randn(72, generator=g).to(torch.bfloat16) * 0.1
    theirs, mine = Gemma2RMSNorm(72, 1e-6), GemmaRMSNorm(72, 1e-6)
    with torch.no_grad():
        theirs.weight.copy_(weight)
        mine.weight.copy_(weight)
    assert torch.equal(theirs.to(torch.bfloat16)(x), mine.to(torch.bfloat16)(x))
    spec = spec_from_config(dict(model_type="gemma2", vocab_size=32, hidden_size=72,
                                 intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 head_dim=36))
    model = GemmaLM(spec).to(torch.bfloat16)
    embedding = Gemma2TextScaledWordEmbedding(32, 72, 0, embed_scale=72 ** 0.5).to(torch.bfloat16)
    embedding.weight = model.model.embed_tokens.weight
    ids = torch.arange(32)[None]
    with torch.no_grad():
        assert torch.equal(model.embed(ids), embedding(ids))


# --- packed rows, generation --------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_packed_rows_equal_documents_run_one_by_one(tiny_models, variant):
    """Documents longer than the window, packed into one row: each token's window stops at
    its own document's start, in the sliding and the full layers."""
    model = ours(tiny_models[variant], "nf4")
    docs = [tokens(3, 1, 11)[0], tokens(4, 1, 15)[0], tokens(5, 1, 6)[0]]
    separate = []
    for doc in docs:
        labels = doc.clone()
        labels[0] = -100
        with torch.no_grad():
            separate.append(model(doc[None], labels=labels[None]))
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    labels = ids.clone()
    labels[0, [0, 11, 26]] = -100
    with torch.no_grad():
        packed = model(ids, position_ids=positions, labels=labels)
        packed_logits = model(ids, position_ids=positions)
        alone = model(docs[1][None])
    torch.testing.assert_close(packed, sum(separate), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_logits[0, 11:26], alone[0], rtol=1e-5, atol=1e-5)


def test_capped_attention_gets_bool_masks_where_others_get_varlen_plans(monkeypatch):
    """On the GPU a packed row's layers get Varlen plans; Gemma 2's capped scores run in torch
    over a mask, so GemmaLM asks layer_masks for dense ones: the bool masks attention_mask makes
    where no varlen kernel exists, for the full and the sliding layers alike."""
    from qlora.models import attention

    positions = torch.cat([torch.arange(5), torch.arange(9), torch.arange(3)]).repeat(2, 1)
    windows = (None, 4)
    without_varlen = attention.layer_masks(windows, positions, 0, torch.device("cpu"))
    monkeypatch.setattr(attention, "varlen_available", lambda device: True)
    plans = attention.layer_masks(windows, positions, 0, torch.device("cpu"))
    dense = attention.layer_masks(windows, positions, 0, torch.device("cpu"), dense=True)
    assert isinstance(plans[0], attention.Varlen)
    assert all(isinstance(m, torch.Tensor) for m in without_varlen + dense)
    for got, want in zip(dense, without_varlen):
        assert torch.equal(got, want)


# --- adapters: PEFT's format, both ways ----------------------------------------------------------

@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_our_adapter_loads_in_peft_with_the_same_logits(tiny_models, tmp_path, variant):
    from peft import PeftModel

    path = tiny_models[variant]
    model = ours(path, "nf4")
    wrapped = attach_adapters(model, AdapterConfig(r=8, alpha=16, dropout=0.0))
    assert "model.layers.1.self_attn.q_proj" in wrapped and len(wrapped) == 2 * 7
    randomize_adapters(model, 1)
    save_adapter(model, tmp_path / "adapter", str(path))
    peft_model = PeftModel.from_pretrained(hf_model(path, "nf4"), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert rel_err(peft_model(tokens(6)).logits, model(tokens(6))) <= 1e-4


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_merged_checkpoint_gives_the_adapted_logits_in_transformers(tiny_models, tmp_path,
                                                                    variant):
    from qlora.merge import merge_adapter

    path = tiny_models[variant]
    model = ours(path)
    attach_adapters(model, AdapterConfig(r=8, alpha=16, dropout=0.0))
    randomize_adapters(model, 3)
    save_adapter(model, tmp_path / "adapter", str(path))
    merged = merge_adapter(path, tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    with torch.no_grad():
        assert rel_err(model.eval()(tokens(8)), hf_model(merged)(tokens(8)).logits) <= 1e-4


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_peft_adapter_loss_and_gradients_match_ours(tiny_models, tmp_path, variant):
    """A peft adapter loads here; one step's loss (capped logits) and adapter gradients equal
    peft's on transformers' model."""
    from peft import LoraConfig, get_peft_model

    path = tiny_models[variant]
    peft_model = get_peft_model(hf_model(path, "nf4"), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    randomize_adapters(peft_model, 2)
    peft_model.save_pretrained(tmp_path / "peft-adapter")
    model = ours(path, "nf4")
    load_adapter(model, tmp_path / "peft-adapter")  # attaches, freezing all but the adapters
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ids = tokens(7, 2, 24)
    labels = ids.clone()
    labels[:, :6] = -100
    peft_model.train()
    model.train()
    ref_loss = peft_model(input_ids=ids, labels=labels).loss
    ref_loss.backward()
    loss = model(ids, labels=labels) / int((labels[:, 1:] != -100).sum())
    loss.backward()
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() <= 1e-4
    ref_grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
                 for n, p in peft_model.named_parameters() if p.requires_grad}
    assert sorted(ref_grads) == sorted(trainable)
    for name, p in trainable.items():
        assert rel_err(ref_grads[name], p.grad) <= 1e-4, name


# --- the fast path --------------------------------------------------------------------------------

GEMMA_TINY = dict(head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
                  attn_logit_softcapping=5.0, final_logit_softcapping=5.0,
                  sliding_window_pattern=2)


def random_gemma(family: str, dropout: float, **overrides):
    """test_step_parts' tiny random NF4 model with LoRA on every projection, as a Gemma."""
    saved = test_step_parts.TINY
    test_step_parts.TINY = {**saved, **GEMMA_TINY, **overrides}
    try:
        return tiny_family_model(family, dropout)
    finally:
        test_step_parts.TINY = saved


def step(model, ids, plan: SpeedPlan | None = None):
    """(loss, adapter gradients) of one checkpointed step, on the reference model (plan None)
    or under `plan`."""
    if plan is not None:
        apply_speed(model, plan)
    model.zero_grad()
    loss = model(ids, labels=ids)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
@pytest.mark.parametrize("final_cap", [5.0, None])
def test_fast_path_gives_the_reference_step(family, final_cap, monkeypatch):
    """Gemma's forks (grouped q/k/v and gate/up, attention kept for the rerun, checkpointed
    layers, the fused cross-entropy with the final soft-cap inside) give the reference GemmaLM's
    loss and adapter gradients. On the CPU Gemma 2's capped scores run dense in torch, so its
    attention is not kept (dense capped scores never are): the rerun recomputes it."""
    from qlora.models.families import gemma as gemma_blocks

    model = random_gemma(family, 0.0, final_logit_softcapping=final_cap)
    model.gradient_checkpointing = True
    model.train()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    calls = {"loss": 0, "attention": 0}
    fused_loss = fast_decoder.linear_cross_entropy_sum
    attention = gemma_blocks.GemmaAttention.sdpa
    monkeypatch.setattr(fast_decoder, "linear_cross_entropy_sum",
                        lambda *a: calls.__setitem__("loss", calls["loss"] + 1) or fused_loss(*a))
    monkeypatch.setattr(gemma_blocks.GemmaAttention, "sdpa", lambda self, *a: calls.__setitem__(
        "attention", calls["attention"] + 1) or attention(self, *a))
    reference = step(model, ids)
    assert calls == {"loss": 0, "attention": 2 * 2}  # 2 layers, each rerun by the checkpoint
    calls.update(attention=0)
    fast = step(model, ids, SpeedPlan(fast_base=True, grouped=True, keep_attention=True,
                                      seeded_dropout=True))
    assert type(model).__name__ == "FastGemmaLM" and grouped_modules(model) == 4
    kept = family != "gemma2"  # gemma2 here: capped scores in torch (no flex on the CPU)
    assert calls == {"loss": 1, "attention": 2 if kept else 4}
    assert_same_step(reference, fast)


@pytest.mark.parametrize("final_cap", [5.0, None])
def test_fast_path_gives_the_reference_per_token_losses(final_cap, monkeypatch):
    """What a preference method sums per sequence: each label token's loss through the fused
    cross-entropy (Gemma 2's final soft-cap inside it) equals the reference's, and so does the
    gradient of a weighted sum of them (each sequence weighed by its own factor)."""
    from qlora.speed import fast_decoder

    fused_caps = []  # the soft-cap each fused call was given: the fast side must take that path

    def spy(h, weight, targets, chunk_tokens, softcap=None):
        fused_caps.append(softcap)
        return linear_cross_entropy_rows(h, weight, targets, chunk_tokens, softcap)

    linear_cross_entropy_rows = fast_decoder.linear_cross_entropy_rows
    monkeypatch.setattr(fast_decoder, "linear_cross_entropy_rows", spy)
    model = random_gemma("gemma2", 0.0, final_logit_softcapping=final_cap)
    model.gradient_checkpointing = True
    model.train()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    weights = torch.linspace(-1.0, 2.0, 2 * 23)

    def per_token(plan=None):
        if plan is not None:
            apply_speed(model, plan)
        model.zero_grad()
        losses = model(ids, labels=ids, per_token=True)
        (losses * weights).sum().backward()
        return losses.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    reference = per_token()
    fast = per_token(SpeedPlan(fast_base=True, grouped=True, keep_attention=True,
                               seeded_dropout=True))
    assert type(model).__name__ == "FastGemmaLM"
    assert fused_caps == [final_cap]  # the reference side never calls it
    # fp32 either way: a row's logsumexp in another order, ~1e-7 of each loss
    assert torch.allclose(fast[0], reference[0], rtol=1e-5, atol=1e-6)
    if final_cap is not None:  # the cap bends these logits: without it the losses differ
        uncapped = model.lm_head(model.hidden_states(ids)).float()[:, :-1].reshape(-1, 300)
        plain = torch.nn.functional.cross_entropy(uncapped, ids[:, 1:].reshape(-1),
                                                  reduction="none")
        assert (plain.detach() - reference[0]).abs().max() > 1e-3
    assert_same_step((fast[0].sum(), fast[1]), (reference[0].sum(), reference[1]))


def assert_same_step(reference, fast) -> None:
    """The same loss; each gradient within 1e-5 of its largest entry (fp32 rounding of the
    grouped GEMM, which Gemma 3's per-head q/k norms amplify past test_dequant_kernel's
    element-wise tolerance on its entries near zero: measured 1.5e-6 at most)."""
    (loss, grads), (fast_loss, fast_grads) = reference, fast
    torch.testing.assert_close(fast_loss, loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, fast_grads):
        assert rel_err(a, b) <= 1e-5


def test_forks_keep_gemmas_math():
    model = random_gemma("gemma2", 0.0)
    apply_speed(model, SpeedPlan(fused_kernels=True, fast_base=True, grouped=True,
                                 seeded_dropout=True))
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"FastGemmaLM", "FastGemmaDecoderLayer", "FastGemmaAttention", "FastGemmaMLP",
            "FastGemmaRMSNorm"} <= kinds
    assert not kinds & {"FastRMSNorm", "FastMLP", "FastDecoderLayer", "RMSNorm", "MLP",
                        "GemmaRMSNorm"}


def test_a_subclass_that_forks_do_not_name_stays_as_it_is():
    """Forking by base class is for FSDP2's wrappers only: a family's subclass of a reference
    block keeps its own forward instead of becoming the reference's fork."""
    from qlora.models.norm import RMSNorm
    from qlora.speed import _forked_class

    class OffsetNorm(RMSNorm):
        pass

    assert _forked_class(OffsetNorm, fast_decoder.FORKS) is None
    fsdp_like = type("FSDPRMSNorm", (type("FSDPModule", (), {}), RMSNorm), {})
    assert issubclass(_forked_class(fsdp_like, fast_decoder.FORKS), fast_decoder.FastRMSNorm)


def test_cuda_graphs_take_gemma3_and_gemma2_through_flex(monkeypatch):
    """Gemma 3's attention is flash varlen attention's (with its scale): the graph step takes it,
    each layer given the graph's offsets with its window. Gemma 2's capped scores need
    flex_attention: the graph step takes the fork with fused_kernels, and refuses the rest."""
    from qlora.models import attention
    from qlora.train.graphs import unsupported_reason

    cuda = torch.device("cuda")
    monkeypatch.setattr(attention, "varlen_takes_window", lambda: True)
    gemma3 = random_gemma("gemma3_text", 0.0)
    apply_speed(gemma3, SpeedPlan(seeded_dropout=True))
    assert unsupported_reason(gemma3, cuda, 64) is None or "varlen" in unsupported_reason(
        gemma3, cuda, 64)  # this machine's torch may lack varlen attention (CPU builds)
    offsets = attention.Varlen(torch.tensor([0, 10, 24], dtype=torch.int32), 24)
    masks = gemma3.layer_masks(torch.zeros(1, 24, dtype=torch.long), 0, "cpu", offsets)
    assert [m.window for m in masks] == [8, None]  # GEMMA_TINY: sliding, then full

    gemma2 = random_gemma("gemma2", 0.0)
    apply_speed(gemma2, SpeedPlan(seeded_dropout=True))
    assert "soft-capped" in gemma2.cuda_graphs_refused
    with pytest.raises(QloraError, match="flex_attention"):
        gemma2(torch.zeros(1, 4, dtype=torch.long), varlen=offsets)
    apply_speed(gemma2, SpeedPlan(fused_kernels=True, seeded_dropout=True))
    assert gemma2.cuda_graphs_refused is None


# --- config.json -------------------------------------------------------------------------------

LEGACY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, sliding_window=16, query_pre_attn_scalar=32)


def test_older_config_files_read_as_transformers_reads_them():
    """Without layer_types: Gemma 2 alternates, Gemma 3 has one full layer in
    sliding_window_pattern; Gemma 3's RoPE in rope_theta / rope_local_base_freq / rope_scaling;
    hidden_act (not silu) beside hidden_activation; tie_word_embeddings absent means tied."""
    from transformers import Gemma2Config, Gemma3TextConfig

    old2 = dict(LEGACY, num_hidden_layers=5, hidden_act="gelu_pytorch_tanh",
                hidden_activation="gelu_pytorch_tanh", rope_theta=10000.0)
    old3 = dict(LEGACY, num_hidden_layers=13, sliding_window_pattern=6, rope_theta=1e6,
                rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0})
    for family, config_class, cfg in ((gemma2, Gemma2Config, old2),
                                      (gemma3, Gemma3TextConfig, old3)):
        kinds = config_class(**cfg).layer_types
        windows = family.settings(cfg).layer_windows
        assert windows == tuple(16 if k == "sliding_attention" else None for k in kinds)
        spec = spec_from_config(dict(cfg, model_type=family.MODEL_TYPE))
        assert spec.tie_word_embeddings and spec.hidden_act == "gelu_pytorch_tanh"
    spec = spec_from_config(dict(old3, model_type="gemma3_text"))
    assert (spec.rope_theta, spec.rope_scaling) == (1e6, {"rope_type": "linear", "factor": 8.0})
    assert gemma3.settings(old3).local_rope_theta == 1e4
    assert gemma3.settings(old3).attn_softcap is None  # Gemma 3 does not cap its scores


@pytest.mark.parametrize("change,message", [
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"hidden_activation": "gelu"}, "hidden_activation 'gelu'"),
    ({"layer_types": ["full_attention"]}, "layer_types must name 2 layers"),
    ({"sliding_window": None}, "sliding_window"),
])
def test_config_gemma_cannot_run_is_refused_where_it_is_read(tiny_models, tmp_path, change,
                                                             message):
    cfg = json.loads((tiny_models["gemma3"] / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QloraError, match=message):
        read_spec(tmp_path)


FUSED_CHECK = r"""
import json, torch
from qlora.kernels import fused
from qlora.models.load import random_model
from qlora.models.spec import spec_from_config
from qlora.adapters import AdapterConfig, attach_adapters
from qlora.quant import QuantConfig
from qlora.speed import SpeedPlan, apply_speed

calls = {"rms_norm": 0, "add_rms_norm": 0, "gemma_rms_norm": 0, "swiglu": 0, "swiglu_packed": 0,
         "rope": 0}
for name in calls:
    def counted(*args, _name=name, _fn=getattr(fused, name)):
        calls[_name] += 1
        return _fn(*args)
    setattr(fused, name, counted)

out = {}
for family in ("gemma2", "gemma3_text"):
    torch.manual_seed(0)
    cfg = dict(model_type=family, hidden_size=48, intermediate_size=100, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=97,
               query_pre_attn_scalar=20, sliding_window=8, sliding_window_pattern=2,
               attn_logit_softcapping=5.0, final_logit_softcapping=5.0)
    quant = QuantConfig(method="none", compute_dtype=torch.float32)
    model = random_model(spec_from_config(cfg), quant, seed=1)
    attach_adapters(model, AdapterConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.train()
    ids = torch.randint(0, 97, (1, 16))  # past the window (8); small: the interpreter is slow
    runs = []
    for on in (False, True):
        apply_speed(model, SpeedPlan(fused_kernels=on))
        model.gradient_checkpointing = on
        model.zero_grad()
        before = dict(calls)
        loss = model(ids, labels=ids)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        runs.append(dict(loss=float(loss), grads=grads,
                         calls={k: calls[k] - before[k] for k in calls}))
    off, on = runs
    out[family] = dict(loss_off=off["loss"], loss_on=on["loss"], calls_off=off["calls"],
                       calls_on=on["calls"],
                       grad_rel=max(float((a - b).abs().max() / b.abs().max())
                                    for a, b in zip(on["grads"], off["grads"])))
print(json.dumps(out))
"""


def test_fused_kernels_reach_gemma_through_rope_and_its_own_norm():
    """Under Triton's interpreter: with fused_kernels on, Gemma's RoPE runs in the Triton kernel
    (the same rotation) and its norms in the (1 + w) norm kernel, and nothing else does (not
    Llama's norm, nor SwiGLU: its MLP is GeGLU); the step is the one with the switch off."""
    from test_dequant_kernel import interpreted

    for family, r in interpreted(FUSED_CHECK).items():
        assert sum(r["calls_off"].values()) == 0, r
        # 2 layers x (forward, checkpoint's rerun) x (q, k) RoPE, x 4 norms (+ Gemma 3's q/k
        # norms), and the final norm once
        norms = 2 * 2 * (4 + (2 if family == "gemma3_text" else 0)) + 1
        assert r["calls_on"] == {"rms_norm": 0, "add_rms_norm": 0, "gemma_rms_norm": norms,
                                 "swiglu": 0, "swiglu_packed": 0, "rope": 2 * 2 * 2}, (family, r)
        assert abs(r["loss_on"] - r["loss_off"]) <= 1e-5 * abs(r["loss_off"]), r
        assert r["grad_rel"] <= 1e-5, r


# --- GGUF ------------------------------------------------------------------------------------------

# what llama.cpp assumes of Gemma (export/gguf.py): query_pre_attn_scalar = head_dim, Gemma 2
# capped and alternating, Gemma 3 with one full layer in six and no final cap
LLAMA_CPP_SHAPES = {"gemma2": dict(query_pre_attn_scalar=32),
                    "gemma3_text": dict(query_pre_attn_scalar=32, num_hidden_layers=6,
                                        sliding_window_pattern=6, final_logit_softcapping=None,
                                        rope_parameters=GEMMA3_SCALED_ROPE)}


@pytest.mark.parametrize("family,arch", [("gemma2", "gemma2"), ("gemma3_text", "gemma3")])
def test_gguf_export_writes_gemma_as_llama_cpp_reads_it(tmp_path, family, arch):
    gguf = pytest.importorskip("gguf")
    from safetensors.torch import load_file

    from qlora.export.gguf import export_gguf
    from qlora.tiny import build_tiny_model

    path = build_tiny_model(tmp_path / family, family, **LLAMA_CPP_SHAPES[family])
    reader = gguf.GGUFReader(str(export_gguf(path, tmp_path / "m.gguf", "f16")))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == arch
    assert field(f"{arch}.attention.sliding_window") == 8
    assert field(f"{arch}.attention.key_length") == 32
    assert field(f"{arch}.rope.freq_base") == (1e4 if arch == "gemma2" else 1e6)  # full layers'
    if arch == "gemma3":  # the full layers' scaling (llama.cpp keeps the sliding layers' plain)
        assert (field("gemma3.rope.scaling.type"), field("gemma3.rope.scaling.factor")) == ("linear", 8.0)
    assert field(f"{arch}.block_count") == LLAMA_CPP_SHAPES[family].get("num_hidden_layers", 2)
    caps = {key: field(f"{arch}.{key}") for key in ("attn_logit_softcapping",
                                                    "final_logit_softcapping")
            if f"{arch}.{key}" in reader.fields}
    assert caps == ({"attn_logit_softcapping": 5.0, "final_logit_softcapping": 5.0}
                    if arch == "gemma2" else {})
    source = load_file(str(path / "model.safetensors"))
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reads the head from token_embd
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), 6)
    for hf_name, value in source.items():
        stored = tensors[names.get_name(hf_name, try_suffixes=(".weight",))]
        got = torch.from_numpy(stored.data.astype("float32")).reshape(value.shape)
        if hf_name.endswith("norm.weight"):  # F32, as 1 + w
            assert torch.equal(got, value.float() + 1), hf_name
        else:  # F16, HF's row order (Gemma's RoPE is llama.cpp's NEOX: nothing permuted)
            assert rel_err(value.float(), got) <= 1e-3, hf_name


def test_gguf_export_refuses_what_llama_cpp_would_run_otherwise(tiny_models, tmp_path):
    from qlora.export.gguf import export_gguf

    pytest.importorskip("gguf")
    with pytest.raises(QloraError, match="query_pre_attn_scalar is 24, llama.cpp uses 32"):
        export_gguf(tiny_models["gemma2"], tmp_path / "m.gguf", "f16")
    with pytest.raises(QloraError, match="one full layer in every 6.*final_logit_softcapping"):
        export_gguf(tiny_models["gemma3"], tmp_path / "m.gguf", "f16")
    assert not list(tmp_path.iterdir())
