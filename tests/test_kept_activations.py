"""keep_activations: with checkpointing, the last N layers are not checkpointed; they keep every
activation for backward and are not rerun (FastDecoderLM.run_layers).

Against the step with every layer checkpointed: the same loss and adapter gradients (the same
ops on the same inputs: a rerun recomputes what the first run made), N fewer layer reruns (their
attention and 4-bit matmuls run once); and the planner's bytes for it: every layer left whole is
the step without checkpointing, what the step holds at its peak is bounded by the plan as the
plan's other settings are (tests/test_moe.py's bound), and `qlora train` takes as many layers as
the plan fits, refusing a count that does not fit before anything loads.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from qlora import memory
from qlora.errors import QloraError
from qlora.speed import SpeedPlan, apply_speed, fast_decoder

from test_grouped_fast_path import tiny_family_model  # noqa: E402
from test_kept_attention import counted_step  # noqa: E402


def _plan(keep_activations, keep_attention=False) -> SpeedPlan:
    return SpeedPlan(fast_base=True, grouped=True, seeded_dropout=True,
                     keep_attention=keep_attention, keep_activations=keep_activations)


# a layer's rerun, grouped: its 4-bit matmuls (q,k,v; o; gate,up: down ends the block and is
# never rerun, but Gemma's post-norm saves the MLP's output, so its rerun runs down too; with its
# attention kept, no q,k,v) and its attention forwards (Gemma's go through its own scores)
RERUN = {("llama", False): (3, 1), ("llama", True): (2, 0), ("phi3", False): (3, 1),
         ("phi3", True): (2, 0), ("gemma3_text", False): (4, None), ("gemma3_text", True): (3, None)}


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma3_text"])
@pytest.mark.parametrize("keep_attention", [False, True])
def test_layers_left_whole_give_the_same_step_without_their_rerun(family, keep_attention,
                                                                  monkeypatch):
    model = tiny_family_model(family, 0.1)  # seeded dropout: the masks must match too
    model.gradient_checkpointing = True
    model.train()
    layers = len(model.model.layers)
    assert layers >= 2
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    checkpointed, made = fast_decoder.CheckpointedLayer, []

    def recording(layer, keep):
        made.append(layer)
        return checkpointed(layer, keep)

    runs = []
    for whole in (False, 1, True):
        applied = apply_speed(model, _plan(whole, keep_attention))
        made.clear()
        monkeypatch.setattr(fast_decoder, "CheckpointedLayer", recording)  # counted_step undoes it
        runs.append(counted_step(model, ids, applied.dropout_seed, applied.dropout_stride,
                                 monkeypatch))
        left_whole = layers if whole is True else int(whole)
        # the last layers are the ones left out of the checkpoint
        assert made == list(model.model.layers)[:layers - left_whole]
    loss, grads, attention, matmuls = runs[0]
    rerun_matmuls, rerun_attention = RERUN[family, keep_attention]
    for whole, (w_loss, w_grads, w_attention, w_matmuls) in zip((1, layers), runs[1:]):
        # the same ops on the same inputs in the same order: bit-equal on the CPU
        assert torch.equal(w_loss, loss)
        assert len(w_grads) == len(grads) > 0
        assert all(torch.equal(a, b) for a, b in zip(w_grads, grads))
        # each layer left whole runs its rerun's matmuls and attention once, not twice
        assert matmuls - w_matmuls == whole * rerun_matmuls
        if rerun_attention is not None:
            assert attention - w_attention == whole * rerun_attention
    apply_speed(model, _plan(layers + 1))
    with pytest.raises(QloraError, match=f"keep_activations.*{layers + 1} layers.*has {layers}"):
        model(ids, labels=ids)


def test_every_layer_left_whole_plans_the_step_without_checkpointing():
    """keep_activations over every layer plans the step without checkpointing, byte for byte
    (the same terms reached from the checkpointed side), less what speed/whole_layer.py remakes
    in backward with the fused kernels: down_proj's input ([tokens, intermediate] bf16 a layer)
    and the normed inputs of attention and the MLP (2 x [tokens, hidden]) for Llama's and
    Phi-3's blocks; nothing for a mixture of experts' or Gemma's; the kept attention of the
    layers left whole is not counted twice."""
    tokens = 2048
    remade = {"llama-3-8b": 2 * 14336 + 2 * 2 * 4096, "phi-4": 2 * 17920 + 2 * 2 * 5120,
              "qwen3-30b-a3b": 0, "gemma-2-9b": 0}
    for shape, per_token in remade.items():
        arch = memory.resolve_arch(shape=shape)
        for kernels, saved_less in (("eager", 0), ("fused", per_token)):
            cfg = memory.PlanConfig(seq_len=tokens, kernels=kernels, keep_attention=True)
            off = memory.plan(arch, replace(cfg, checkpointing=False))
            less = arch.num_layers * tokens * saved_less
            for whole in (True, arch.num_layers):
                b = memory.plan(arch, replace(cfg, keep_activations=whole))
                assert (b.activations, b.backward_activations, b.backward) == (
                    off.activations - less, off.backward_activations - less, off.backward), shape
        # past the first layers, each one left whole adds what it saves for backward less the
        # input and LoRA products the checkpoint kept of it, and the attention it kept
        steps = [memory.plan(arch, replace(cfg, keep_activations=n)).activations
                 for n in (4, 5, 6)]
        assert steps[2] - steps[1] == steps[1] - steps[0] > 0


WHOLE_LAYER_CHECK = r"""
import json, sys, torch
sys.path.insert(0, TESTS_DIR)
from live_bytes import LiveBytes
from qlora.adapters import AdapterConfig, attach_adapters, set_dropout_seed
from qlora.models.load import random_model
from qlora.models.spec import spec_from_config
from qlora.quant import QuantConfig
from qlora.speed import SpeedPlan, apply_speed
from qlora.speed.whole_layer import whole_layer

out = []
for family in ("llama", "phi3"):
    config = dict(model_type=family, hidden_size=128, intermediate_size=352, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                  tie_word_embeddings=False, max_position_embeddings=256, rms_norm_eps=1e-6,
                  rope_theta=10000.0)
    tokens = 64
    model = random_model(spec_from_config(config), QuantConfig(method="nf4", double_quant=True,
                                                                compute_dtype=torch.bfloat16))
    # dropout on: down_proj's masks are drawn from its seed over the remade input, which must
    # equal the saved one
    attach_adapters(model, AdapterConfig(r=8, alpha=16, dropout=0.1))
    model.train()
    applied = apply_speed(model, SpeedPlan(fused_kernels=True, fast_base=True, grouped=True,
                                           seeded_dropout=True))
    for p in model.parameters():  # B = 0 at the start would give lora_A no gradient
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    layer = model.model.layers[0]
    x0 = model.model.embed_tokens(torch.randint(0, 300, (1, tokens))).detach()
    cos, sin = model.model.rotary_emb(torch.arange(tokens)[None], x0.dtype)
    upstream = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)).to(x0.dtype)
    runs = []
    for whole in (False, True):
        set_dropout_seed(applied.dropout_seed, run_seed=3, micro_batch_index=0,
                         stride=applied.dropout_stride)
        x = x0.clone().requires_grad_(True)
        count = LiveBytes()
        with count:
            if whole:
                with whole_layer():
                    y = layer(x, cos, sin, "causal")
            else:
                y = layer(x, cos, sin, "causal")
            held = count.current  # what the forward leaves: its output and what autograd saved
            y.backward(upstream)
        grads = [x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]
        runs.append((held, grads))
        layer.zero_grad(set_to_none=True)
    (held, grads), (whole_held, whole_grads) = runs
    # the SwiGLU output [tokens, 352] and the two normed inputs [tokens, 128], in bf16
    out.append(dict(family=family, freed=held - whole_held, remade=tokens * (352 + 2 * 128) * 2,
                    grads=len(grads), nonzero=sum(bool(g.abs().sum() > 0) for g in grads),
                    equal=all(torch.equal(a, b) for a, b in zip(grads, whole_grads))))
print(json.dumps(out))
"""


def test_a_whole_layer_remakes_the_swiglu_output_for_down_proj():
    """On the fast path with the fused kernels (Triton's interpreter on the CPU), a layer left
    whole does not hold its SwiGLU output and its two normed inputs from forward to backward: it
    holds exactly those tensors' bytes less, and its backward, which remakes them, gives the same
    input and adapter gradients bit for bit."""
    from pathlib import Path

    from test_fused_kernels import interpreted

    results = interpreted(WHOLE_LAYER_CHECK.replace("TESTS_DIR", repr(str(Path(__file__).parent))))
    assert [r["family"] for r in results] == ["llama", "phi3"]
    for r in results:
        assert r["freed"] == r["remade"], r
        assert r["equal"] and r["nonzero"] == r["grads"] > 1, r


# a dense layer as memory.activations counts it on the CPU's path: eager norms, no fast base
PLANNER_CONFIG = dict(model_type="llama", hidden_size=128, intermediate_size=352,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=300, tie_word_embeddings=False, max_position_embeddings=512,
                      rms_norm_eps=1e-6, rope_theta=10000.0)


def _step_peak(whole: int) -> int:
    """The bytes a second step of the planner's small 4-bit Llama (LoRA r8 on every linear, no
    dropout) holds at its peak above what lives between steps, the last `whole` layers left
    whole, counted op by op."""
    from live_bytes import LiveBytes, stepped_nf4_model

    torch.manual_seed(0)
    model, _, ids = stepped_nf4_model(
        PLANNER_CONFIG, SpeedPlan(seeded_dropout=True, keep_activations=whole), PLANNER_TOKENS)
    count = LiveBytes()
    with count:
        model(ids, labels=ids).backward()
    return count.peak


PLANNER_TOKENS = 256


def test_each_layer_left_whole_adds_what_the_planner_counts():
    """Past the first layer left whole, each further one adds to the step's peak (the last
    layer's backward, every saved activation alive) exactly what the planner adds: that layer's
    saved activations less the input the checkpoint kept of it, and its adapter copies. (The
    first one also drops the rerun's own backward, whose CPU bytes the planner bounds from
    above: not compared here.)"""
    measured = [_step_peak(whole) for whole in (1, 2, 3)]
    planned = [memory.plan(memory.arch_from_config(PLANNER_CONFIG), memory.PlanConfig(
        r=8, lora_dropout=0.0, seq_len=PLANNER_TOKENS, alloc_rounding=False, kernels="eager",
        optimizer="adamw_torch", embedding_on_host=False, keep_activations=whole)).allocated
        for whole in (1, 2, 3)]
    growth = [b - a for a, b in zip(measured, measured[1:])]
    assert growth[0] > 0
    assert growth == [b - a for a, b in zip(planned, planned[1:])]


def test_train_leaves_whole_as_many_layers_as_the_plan_fits(run_inputs):
    """RunConfig.keep_activations None (the default): check_run leaves whole as many of the last
    layers as the plan fits on the GPU, after keep_attention (none on the CPU with no GPU size,
    nor under auto_fit, nor where offload or tiles are needed); a count that does not fit is
    refused with the count that does, and one past the model's layers before loading."""
    from qlora.config import RunConfig

    model, data = run_inputs
    cfg = RunConfig(model=str(model), data=str(data), quant="none", max_seq_length=4096,
                    keep_attention=True)
    arch = memory.resolve_arch(model_dir=str(model))
    layers = arch.num_layers
    pc = memory.plan_config_for_run(cfg)
    need = [memory.needed_bytes(memory.plan(arch, replace(pc, keep_activations=n)))
            for n in range(layers + 1)]
    # (the first layer left whole costs nothing at this plan's peak: its whole backward drops
    # the rerun's, as test_memory's first kept attention)
    assert layers == 2 and need[layers] > need[layers - 1] >= need[0]
    logged = []
    for size, want in ((need[layers], True), (need[layers - 1], layers - 1)):
        resolved, _ = memory.check_run(replace(cfg, gpu_memory=f"{size / 2**20}MiB"), "cpu",
                                       log=logged.append)
        assert resolved.keep_activations == want and type(resolved.keep_activations) is type(want)
    assert any("keep_activations: on (every layer" in line for line in logged)
    assert any(f"keep_activations: {layers - 1} (the last {layers - 1} of {layers}" in line
               for line in logged)
    assert memory.check_run(cfg, "cpu")[0].keep_activations is False  # no GPU size
    fits_all = replace(cfg, gpu_memory=f"{need[layers] / 2**20}MiB")
    assert memory.check_run(replace(fits_all, auto_fit=True), "cpu",
                            log=logged.append)[0].keep_activations is False
    fits_one_less = replace(cfg, gpu_memory=f"{need[layers - 1] / 2**20}MiB")
    with pytest.raises(QloraError, match=f"at most {layers - 1} layers.*keep_activations: "
                                         f"{layers - 1}"):
        memory.check_run(replace(fits_one_less, keep_activations=True), "cpu")
    with pytest.raises(QloraError, match=f"keep_activations.*{layers + 1} layers.*has {layers}"):
        memory.check_run(replace(cfg, keep_activations=layers + 1), "cpu")  # before any loading
    # mid-run out of memory: giving the whole layers back comes first
    text = str(memory.out_of_memory_error(replace(fits_all, keep_activations=True), "cpu",
                                          RuntimeError("CUDA out of memory")))
    assert text.split("change one of:")[1].strip().startswith("keep_activations: false (~")


def test_whole_layers_exclude_offload_and_tiles():
    from qlora.config import load_config

    base = dict(model="m", data="d.jsonl")
    for option, value in (("offload_activations", True), ("tile_mlp", 1024)):
        with pytest.raises(QloraError, match=f"`keep_activations` and `{option}` exclude"):
            load_config(None, dict(base, keep_activations=2, **{option: value}))
        with pytest.raises(QloraError, match="--keep-activations excludes"):
            memory.PlanConfig(keep_activations=2, **{option: value}).validate()
    assert load_config(None, dict(base, keep_activations="3")).keep_activations == 3


def test_the_planner_remakes_only_what_the_runtime_does():
    """speed/whole_layer.py remakes what the fused kernels make: the normed inputs wherever the
    fused RMSNorm runs; down_proj's input where the packed SwiGLU kernel does, Phi-3's one
    gate_up_proj whenever it runs, Llama's gate and up only as one grouped GEMM (both LoRA
    targets, no DoRA, not sharded by FSDP, which leaves the 4-bit fast path off). Nothing of a
    mixture of experts' or Gemma's layer."""
    from qlora.memory.activations import remade_in_whole_layer

    def remade(shape, **changes):
        cfg = replace(memory.PlanConfig(seq_len=2048, kernels="fused"), **changes)
        return set(remade_in_whole_layer(memory.resolve_arch(shape=shape), cfg))

    norms = {"attention input (normed)", "MLP input (normed)"}
    down = {"MLP: down_proj input"}
    assert remade("llama-3-8b") == remade("llama-3-8b", gpus=2) == norms | down  # DDP: fast path
    for changes in (dict(targets="q_proj,v_proj,down_proj"), dict(dora=True),
                    dict(gpus=2, sharding="fsdp")):
        assert remade("llama-3-8b", **changes) == norms, changes
    assert remade("llama-3-8b", kernels="eager") == set()
    assert remade("phi-4", gpus=2, sharding="fsdp") == remade("phi-4") == norms | down
    assert remade("qwen3-30b-a3b") == remade("gemma-2-9b") == set()


def test_advice_gives_the_whole_layers_back_first_and_never_pairs_them_with_offload():
    """A plan that does not fit with layers left whole: the first advice is to leave none whole;
    where that is not enough, the other changes come without them (offload and tiles exclude
    them, and `qlora plan` used to fail offering those)."""
    arch = memory.resolve_arch(shape="llama-3-8b")
    gib = 2**30
    tight = memory.PlanConfig(seq_len=16384, keep_activations=8)
    (first,) = memory.advise(arch, tight, 24 * gib)
    assert first.changes == {"keep_activations": False} and first.text == "no --keep-activations"
    longer = replace(tight, seq_len=65536)
    advice = memory.advise(arch, longer, 24 * gib)
    assert advice and all(a.breakdown.cfg.keep_activations is False for a in advice)
    assert any(a.breakdown.cfg.offload_activations or a.breakdown.cfg.tile_mlp for a in advice)
    assert all("--keep-activations" in a.text for a in advice if a.changes)
    # where nothing fits, the verdict stays one (no changes), not advice to follow
    (verdict,) = memory.advise(arch, tight, 4 * gib)
    assert verdict.changes == {} and verdict.text.startswith("does not fit even")
