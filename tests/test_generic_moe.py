"""Mixtures of experts on the generic path (models/generic.py) against transformers and peft.

Qwen2-MoE (shared expert, its gate) and OLMoE (q/k norms, no shared expert): transformers 5
holds a layer's experts as two 3D parameters (experts.gate_up_proj [E, 2I, H], experts.down_proj
[E, H, I]) but its save_pretrained writes one tensor per expert and projection, as the Hub's
files are, and converts them back as it loads (WeightConverter: MergeModulelist, Concatenate).
Our loader runs transformers' own converter over each parameter's tensors. Qwen2-MoE has 12
experts, so expert 10 must follow expert 9 (a name sort would put it after expert 1).

Tolerances as in test_generic.py: fp32 rounding only (1e-5), 1e-4 where bitsandbytes computes.
"""

from __future__ import annotations

import pytest
import torch
from test_generic import (FP32, NF4, NONE, assert_merged_is_peft_s,
                          assert_same_adapter_gradients, build_generic, held_bytes, hf_model,
                          hf_nf4, load_counting_alive, merged_random_adapter, peft_all_linear,
                          peft_twin, randomize_b, rel_err, tokens, with_config)

from qlora.adapters import AdapterConfig, attach_adapters, save_adapter
from qlora.models import GenericLM, load_model

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, num_experts_per_tok=2)
MOE_SIZES = {
    "qwen2_moe": dict(COMMON, num_experts=12, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64),
    "olmoe": dict(COMMON, num_experts=4),
}
EXPERTS = {t: sizes["num_experts"] for t, sizes in MOE_SIZES.items()}


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("generic-moe")
    return {t: build_generic(root / t, t, seed=20 + i, sizes=sizes)
            for i, (t, sizes) in enumerate(MOE_SIZES.items())}


def stored_keys(path) -> list[str]:
    from safetensors import safe_open

    keys = []
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            keys += list(f.keys())
    return keys


def fused_copy(path, out):
    """`path`'s model saved as its own parameters (experts.gate_up_proj [E, 2I, H], ...), the
    layout a plain torch save of the loaded model has, the rest of the folder as is."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(path, out)
    for file in out.glob("*.safetensors"):
        file.unlink()
    state = {k: v.contiguous() for k, v in hf_model(path).state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# --- loading --------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", list(MOE_SIZES))
def test_per_expert_checkpoints_load_as_transformers_stacks_them(moe_models, model_type):
    """save_pretrained writes one tensor per expert (the Hub's layout); loaded here, every
    parameter, the experts' stacked ones included, and the logits are transformers'."""
    path = moe_models[model_type]
    keys = stored_keys(path)
    assert f"model.layers.1.mlp.experts.{EXPERTS[model_type] - 1}.up_proj.weight" in keys
    assert not any(k.endswith("experts.gate_up_proj") for k in keys)
    ours = load_model(path, NONE)
    ref = hf_model(path).eval()
    assert isinstance(ours, GenericLM) and ours.spec.model_type == model_type
    assert ours.spec.num_params() == sum(p.numel() for p in ref.parameters())
    ref_state = ref.state_dict()
    for name, param in ours.named_parameters():
        assert torch.equal(param, ref_state[name]), name
    ids = tokens()
    with torch.no_grad():
        assert rel_err(ref(ids).logits, ours(ids)) <= 1e-5


def test_a_checkpoint_of_the_stacked_parameters_loads_too(moe_models, tmp_path):
    path = moe_models["qwen2_moe"]
    fused = fused_copy(path, tmp_path / "fused")
    assert "model.layers.0.mlp.experts.gate_up_proj" in stored_keys(fused)
    ids = tokens(1)
    with torch.no_grad():
        assert rel_err(load_model(path, NONE)(ids), load_model(fused, NONE)(ids)) == 0


@pytest.mark.parametrize("shard", ["60KB", None])
def test_a_layers_experts_are_held_only_until_their_parameter_is_made(moe_models, tmp_path,
                                                                      monkeypatch, shard):
    """Each expert tensor read is gone once its stacked parameter is made, so at most one
    layer's experts (3 tensors an expert) are alive when the next tensor is read, never the
    checkpoint's: in one file (where tensors held to its end would be both layers', 2 · 3 · E)
    and sharded so that a layer's experts span files."""
    sharded = tmp_path / "sharded"
    kwargs = {} if shard is None else {"max_shard_size": shard}
    hf_model(moe_models["qwen2_moe"]).save_pretrained(str(sharded), **kwargs)
    files = list(sharded.glob("*.safetensors"))
    assert len(files) > 2 if shard else len(files) == 1
    model, most = load_counting_alive(sharded, NONE, monkeypatch, lambda key: ".experts." in key)
    assert 0 < most < 3 * EXPERTS["qwen2_moe"]
    ids = tokens(2)
    with torch.no_grad():
        assert rel_err(hf_model(sharded).eval()(ids).logits, model(ids)) <= 1e-5


def test_a_missing_experts_weight_is_refused_naming_the_parameter(moe_models, tmp_path):
    from safetensors.torch import load_file, save_file

    from qlora.errors import QloraError

    broken = fused_copy(moe_models["olmoe"], tmp_path / "broken")
    state = load_file(str(moe_models["olmoe"] / "model.safetensors"))
    del state["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QloraError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj"):
        load_model(broken, NONE)


def test_nf4_matches_transformers_and_bitsandbytes_experts_in_16_bits(moe_models):
    """bitsandbytes quantizes the linear layers (attention, the shared expert and its gate);
    the experts' 3D parameters and the router stay in the compute dtype, on both sides; the
    log says so."""
    path = moe_models["qwen2_moe"]
    ref = hf_nf4(path).eval()
    ours = load_model(path, NF4)
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    quantized = {k for k in ref_state if ref_state[k].dtype == torch.uint8}
    assert "model.layers.0.mlp.shared_expert_gate.weight" in quantized
    assert {k for k in our_state if our_state[k].dtype == torch.uint8} == quantized
    for key in ref_state:
        assert torch.equal(ref_state[key], our_state[key]), f"{key} differs from bitsandbytes'"
    for key in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.gate.weight"):
        assert our_state[key].dtype == FP32
    assert any("stacked 3D weights" in n and "not nf4" in n for n in ours.notes)
    ids = tokens(3)
    with torch.no_grad():
        assert rel_err(ref(ids).logits, ours(ids)) <= 1e-4


# --- adapters -------------------------------------------------------------------------------------
def test_all_linear_is_peft_s_on_qwen2_moe_and_its_linears_on_olmoe(moe_models):
    """Qwen2-MoE: PEFT's all-linear is every linear layer (attention, shared expert, its gate),
    ours too. OLMoE: PEFT 0.21 also adapts the experts' 3D parameters and the router
    (target_parameters, from its table of model types transformers converts); this path adapts
    the linear layers only, which the log says."""
    for model_type in MOE_SIZES:
        ours = load_model(moe_models[model_type], NONE)
        wrapped = set(attach_adapters(ours, AdapterConfig(r=2, alpha=4, dropout=0.0)))
        theirs = peft_all_linear(moe_models[model_type])
        if model_type == "qwen2_moe":
            assert wrapped == theirs
            assert "model.layers.0.mlp.shared_expert_gate" in wrapped
        else:
            extra = {f"model.layers.{i}.mlp.{m}" for i in range(2) for m in ("experts", "gate")}
            assert theirs - wrapped <= extra | {f"{e}.base_layer" for e in extra}
            assert wrapped < theirs and "model.layers.0.mlp.experts" in theirs
        assert not any(".experts." in n or n.endswith((".experts", ".mlp.gate")) for n in wrapped)
        assert any("get no adapters" in n for n in ours.notes)


@pytest.mark.parametrize("model_type", list(MOE_SIZES))
def test_training_loss_and_gradients_match_peft(moe_models, model_type):
    """One training batch: the summed loss over the label tokens and every adapter gradient
    equal transformers + peft's, the routing through the experts included."""
    ours, theirs = twins(moe_models[model_type])
    assert not ours.aux_loss  # config.json leaves output_router_logits off
    ids = tokens(4)
    labels = ids.clone()
    labels[:, :6] = -100
    n_labels = int((labels[:, 1:] != -100).sum())
    loss_sum = ours(ids, labels=labels)
    reference = theirs(input_ids=ids, labels=labels).loss
    (loss_sum / n_labels).backward()
    reference.backward()
    assert float(loss_sum.detach()) / n_labels == pytest.approx(float(reference.detach()), rel=1e-5)
    assert_same_adapter_gradients(ours, theirs)


def twins(path):
    """Our model with random adapters on all its linear layers, and transformers + peft with
    the same adapters, both in train mode."""
    cfg = AdapterConfig(r=4, alpha=8, dropout=0.0)
    ours = load_model(path, NONE)
    torch.manual_seed(0)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in attach_adapters(ours, cfg)})
    randomize_b(ours)
    theirs = peft_twin(path, ours, cfg, target_modules=leaves)
    return ours.train(), theirs.train()


def test_saved_adapter_loads_in_peft_over_the_nf4_base(moe_models, tmp_path):
    from peft import PeftModel

    path = moe_models["qwen2_moe"]
    ours = load_model(path, NF4)
    attach_adapters(ours, AdapterConfig(r=4, alpha=8, dropout=0.0))
    randomize_b(ours)
    save_adapter(ours, tmp_path / "ours", str(path))
    peft_model = PeftModel.from_pretrained(hf_nf4(path), tmp_path / "ours").eval()
    ids = tokens(5)
    with torch.no_grad():
        mine = ours.eval()(ids)
        assert rel_err(peft_model(ids).logits, mine) <= 1e-4
        # the adapter changes them: B drawn large (randomize_b), far past the 1e-4 above
        assert rel_err(hf_nf4(path).eval()(ids).logits, mine) > 1e-3


def test_merge_keeps_one_tensor_per_expert_and_transformers_loads_it(moe_models, tmp_path):
    """The merged checkpoint names its tensors as the base's files do (each expert's own, which
    transformers stacks again as it loads); its logits are transformers + peft's."""
    path = moe_models["qwen2_moe"]
    _, merged = merged_random_adapter(path, NONE, tmp_path)
    assert sorted(stored_keys(merged)) == sorted(stored_keys(path))
    assert_merged_is_peft_s(path, merged, tmp_path / "adapter", tokens(6))


def test_peft_s_adapter_on_olmoe_s_experts_is_refused_by_merge_naming_them(moe_models, tmp_path):
    """PEFT's all-linear on OLMoE adapts its stacked experts and router (target_parameters),
    which merge folds into Mixtral's and Qwen3-MoE's Hub layouts only: refused by name (it was
    a bare KeyError), nothing written."""
    import peft
    from transformers import AutoModelForCausalLM

    from qlora.errors import QloraError
    from qlora.merge import merge_adapter

    path = moe_models["olmoe"]
    base = AutoModelForCausalLM.from_pretrained(str(path), dtype=FP32)
    peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear")
                        ).save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(QloraError, match=r"mlp\.(gate|experts).* Mixtral and Qwen3-MoE .*'olmoe'"):
        merge_adapter(path, tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    assert not (tmp_path / "merged").exists()


def test_the_router_loss_is_added_as_transformers_adds_it(moe_models, tmp_path):
    """config.json's output_router_logits on: transformers' loss is its mean cross-entropy +
    router_aux_loss_coef · its load-balancing loss (load_balancing_loss_func, over the tokens
    its attention mask keeps); our sum over the label tokens, divided by them as the loop does,
    is that loss and gives the same adapter gradients, a padded row's padding left out of the
    routing by `real_lengths` as transformers leaves it out by the mask."""
    path = with_config(moe_models["olmoe"], tmp_path / "olmoe-aux", output_router_logits=True,
                       router_aux_loss_coef=0.5)
    ours, theirs = twins(path)
    assert ours.aux_loss
    ids = tokens(7)
    lengths = torch.tensor([24, 15])
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 15:] = -100  # the second row's padding
    mask = (torch.arange(24) < lengths[:, None]).long()
    n_labels = int((labels[:, 1:] != -100).sum())
    loss_sum = ours(ids, labels=labels, real_lengths=lengths)
    reference = theirs(input_ids=ids, labels=labels, attention_mask=mask)
    # E · Σ f·P with f summing to top_k: top_k (2 here) when the routing is even; the bound only
    # says the loss compared below is not a vanishing term
    assert float(reference.aux_loss.detach()) > 0.5
    (loss_sum / n_labels).backward()
    reference.loss.backward()
    assert float(loss_sum.detach()) / n_labels == pytest.approx(float(reference.loss.detach()),
                                                                rel=1e-5)
    assert_same_adapter_gradients(ours, theirs)
    with torch.no_grad():
        every_token = float(ours(ids, labels=labels)) / n_labels  # transformers without a mask
        assert every_token == pytest.approx(float(theirs(input_ids=ids, labels=labels).loss),
                                            rel=1e-5)
        ours.aux_loss = False  # train's router_aux_loss: false
        cross_entropy = float(ours(ids, labels=labels, real_lengths=lengths)) / n_labels
    assert float(loss_sum.detach()) / n_labels - cross_entropy == pytest.approx(
        0.5 * float(reference.aux_loss.detach()), rel=1e-5)


def test_plan_counts_the_16bit_experts_exactly(moe_models):
    """`qlora plan`'s weights are the bytes our loaded 4-bit model holds, its experts' stacked
    parameters in the compute dtype among them."""
    from qlora import memory

    path = moe_models["qwen2_moe"]
    b = memory.plan(memory.resolve_arch(model_dir=str(path)),
                    memory.PlanConfig(alloc_rounding=False, nonquant_dtype="fp32"))
    model = load_model(path, NF4)
    experts = model.get_parameter("model.layers.0.mlp.experts.gate_up_proj")
    assert experts.dtype == FP32 and b.base + b.embeddings + b.norms == held_bytes(model)


def test_a_dpo_step_with_the_router_loss_equals_trl_dpo_trainer(tmp_path):
    """DPO on Qwen2-MoE on the generic path, config.json's output_router_logits on (coefficient
    0.3: the aux term, about 0.3, far above the bound on a loss of about 0.7): one padded
    micro-batch through our model against TRL's DPOTrainer on transformers + peft with the same
    attention adapter: the loss (TRL's mean + coef · the policy forward's aux), its logged
    aux_loss and every adapter gradient agree to rel 1e-4, as test_preference's DPO step."""
    from trl import DPOConfig, DPOTrainer

    from qlora.data.preference import pair_batch
    from qlora.methods import dpo
    from qlora.methods.preference import PreferenceOptions, batch_loss
    from test_moe import ATTENTION as attention
    from test_preference import (_randomize, _router_step_agrees_with_trl, _trl_args,
                                 _trl_pair_inputs, _trl_peft_model, _varied_examples)

    sizes = dict(MOE_SIZES["qwen2_moe"], output_router_logits=True, router_aux_loss_coef=0.3)
    path = build_generic(tmp_path / "model", "qwen2_moe", seed=5, sizes=sizes)
    ours = load_model(path, NONE)
    attach_adapters(ours, AdapterConfig(r=4, alpha=8, dropout=0.0, target_modules=attention))
    _randomize(ours, 7, 0.3)
    ours.train()
    assert ours.adds_router_loss
    save_adapter(ours, tmp_path / "adapter", str(path))
    examples = _varied_examples("pairs")
    B = len(examples)
    loss_sum, sums = batch_loss(dpo, ours, pair_batch(examples, 0), PreferenceOptions(beta=0.3))
    (loss_sum / B).backward()

    args = _trl_args(DPOConfig, tmp_path / "trl", B, beta=0.3)
    trainer, peft_model = _trl_peft_model(DPOTrainer, args, path, tmp_path / "adapter",
                                          targets=attention)
    inputs = _trl_pair_inputs(examples)
    _router_step_agrees_with_trl(ours, loss_sum, sums, B, trainer, peft_model, inputs)


def test_a_conversion_that_splits_a_tensor_is_refused_naming_it(tmp_path):
    """HRM-Text stores q, k, v and a gate fused (attn.gqkv_proj), which transformers splits into
    four linear layers as it loads: a conversion other than stacking experts, refused before
    anything is read, naming the tensor."""
    from qlora.errors import QloraError
    from qlora.tiny import build_tiny_generic

    path = build_tiny_generic(tmp_path / "hrm", "hrm_text", hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, head_dim=16,
                              num_layers_per_stack=1, max_position_embeddings=256)
    with pytest.raises(QloraError, match=r"attn\.gqkv_proj\.weight is one of the tensors "
                                         r"transformers converts .*and others"):
        load_model(path, NONE)
