"""The memory planner: exact where the CPU can check it (bitsandbytes bytes, PEFT's parameter
count), and the CLI, advice and auto-fit behaviour. GPU calibration is benchmarks/measure_memory.py."""

from dataclasses import replace

import pytest
import torch

from qlora import memory
from qlora.cli import main
from qlora.errors import QloraError
from qlora.memory import GiB, PlanConfig, arch_from_config, plan
from qlora.tiny import tiny_config
from saved_bytes import layer_saved_bytes

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
    ("gemma2", "all-linear", False),  # four norms a block, a head_dim of its own
    ("gemma3_text", "all-linear", True),  # and q/k norms
    ("phi3", "all-linear", False),  # qkv_proj, gate_up_proj
    ("phi3", ["qkv_proj", "down_proj"], True),
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
    assert memory.weights.adapter_param_count(arch, cfg) == trainable
    assert plan(arch, cfg).adapter_params == trainable
    # and the architecture's own size agrees with the model's
    assert arch.num_params() == base_params


def test_named_shapes_have_their_real_sizes():
    # published parameter counts of the models these shapes copy
    for name, billions in [("qwen2.5-1.5b", 1.54), ("llama-3-8b", 8.03), ("llama-2-7b", 6.74),
                           ("llama-2-13b", 13.02), ("llama-2-70b", 68.98), ("qwen2.5-7b", 7.62),
                           ("mistral-7b", 7.24), ("mistral-nemo-12b", 12.25), ("gemma-2-2b", 2.61),
                           ("gemma-2-9b", 9.24), ("gemma-3-1b", 1.00), ("phi-3-mini-4k", 3.82),
                           ("phi-4", 14.66), ("stablelm-2-1.6b", 1.64)]:
        assert memory.resolve_arch(shape=name).num_params() / 1e9 == pytest.approx(billions, abs=0.01), name
    # what each family reads its own way, from the real config.json values
    nemo, gemma2, phi4 = (memory.resolve_arch(shape=s) for s in ("mistral-nemo-12b", "gemma-2-9b", "phi-4"))
    assert nemo.head_dim == 128 != nemo.hidden_size // nemo.num_heads
    assert gemma2.layer_windows[:4] == (4096, None, 4096, None) and gemma2.tie_word_embeddings
    assert phi4.block_linears() == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    assert memory.resolve_arch(shape="gemma-3-1b").layer_windows[:6] == (512,) * 5 + (None,)


def test_cli_prints_table_and_answers_fits(capsys):
    assert main(["plan", "--shape", "llama-3-8b", "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    for part in ("4-bit base (nf4, double quant)", "16-bit lm_head (bf16; the input embedding in host memory)",
                 "adapter gradients", "optimizer states", "activations", "workspace", "peak allocated",
                 "fits on"):
        assert part in out
    assert "does NOT fit" not in out
    assert "qlora train keeps attention for backward in every layer here" in out  # 80 GB: room
    assert "--keep-attention shows that plan" in out
    # 24 GB at 16384 tokens: in some of the layers, with the plan that shows it
    assert main(["plan", "--shape", "llama-3-8b", "--gpu-memory", "24GB", "--seq-len", "16384"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if "keeps attention" in x][0]
    n = int(line.split("in the last ")[1].split(" of 32 layers")[0])
    assert 0 < n < 32 and line.endswith(f"--keep-attention {n} shows that plan")
    assert main(["plan", "--shape", "llama-3-8b", "--gpu-memory", "24GB", "--seq-len", "16384",
                 "--keep-attention", str(n)]) == 0
    out = capsys.readouterr().out
    assert f"attention kept for backward in {n} of 32 layers" in out and "fits on" in out
    # qlora train's defaults on a GPU: the embedding in host memory; on the GPU, both tables
    assert main(["plan", "--shape", "llama-3-8b", "--no-embedding-on-host"]) == 0
    assert "16-bit embeddings + lm_head (untied, bf16)" in capsys.readouterr().out


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


def test_cli_plans_another_architecture_coarsely_and_refuses_remote_code(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_embd": 768, "n_layer": 2}')
    assert main(["plan", "--config-json", str(tmp_path / "config.json")]) == 0
    assert "a coarser estimate: gpt2 runs on the generic path" in capsys.readouterr().out
    (tmp_path / "config.json").write_text(
        '{"model_type": "my_lm", "auto_map": {"AutoModelForCausalLM": "my_lm.Model"}}')
    assert main(["plan", "--config-json", str(tmp_path / "config.json")]) == 2
    assert "model_type 'my_lm' exists only as code" in capsys.readouterr().err


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


def test_advice_offers_mlp_tiles_only_where_they_act():
    """A mixture of experts' sparse blocks are not tiled (the planner counts no tile there): no
    advice names --tile-mlp for Qwen3-30B-A3B, while a dense model's long row gets it."""
    moe, cfg = memory.resolve_arch(shape="qwen3-30b-a3b"), PlanConfig(seq_len=8192, keep_attention=0)
    advice = memory.advise(moe, cfg, 32 * GiB)
    assert advice and all(a.changes for a in advice)
    assert not any("tile_mlp" in a.changes for a in advice)
    dense = memory.advise(memory.resolve_arch(shape="llama-3-8b"),
                          PlanConfig(seq_len=65536), 24 * GiB)
    assert any("tile_mlp" in a.changes for a in dense)


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


def test_auto_fit_keeps_checkpointing_for_preference_methods():
    """A preference step pays three dequantize passes a micro-batch (policy, reference, backward):
    auto-fit keeps checkpointing where it holds more examples a micro-batch (measured 1.05x at
    Llama-3-8B DPO, with the no-checkpointing step's row then padded 17%: memory/fitting.auto_fit),
    where SFT drops it to micro-batch 1."""
    arch = memory.resolve_arch(shape="llama-3-8b")
    gpu = 24 * GiB
    sft = memory.auto_fit(arch, PlanConfig(seq_len=1024), gpu, max_micro_batch=8)
    assert (sft.micro_batch, sft.checkpointing) == (1, False)
    for method, extra in (("dpo", {"prompt_len": 512}), ("orpo", {"prompt_len": 512}), ("kto", {})):
        cfg = PlanConfig(seq_len=1024, method=method, **extra)
        assert memory.fits(plan(arch, replace(cfg, micro_batch=1, checkpointing=False)), gpu)
        best = memory.auto_fit(arch, cfg, gpu, max_micro_batch=8)
        assert best.checkpointing and best.micro_batch > 1, method
        assert memory.fits(plan(arch, best), gpu)
    # the micro-batches compared are those the run uses, divisors of its global batch: at 80 GB
    # both reach 4 of a global batch of 4, where the recompute buys nothing (off); of 7, no
    # checkpointing fits fewer than 7, which divide 7 only as 1 (on, at 7)
    cfg = PlanConfig(seq_len=1024, method="dpo", prompt_len=512)
    four = memory.auto_fit(arch, cfg, 80 * GiB, max_micro_batch=4, global_batch=4)
    assert (four.micro_batch, four.checkpointing) == (4, False)
    seven = memory.auto_fit(arch, cfg, 80 * GiB, max_micro_batch=7, global_batch=7)
    assert not memory.fits(plan(arch, replace(cfg, micro_batch=7, checkpointing=False)), 80 * GiB)
    assert (seven.micro_batch, seven.checkpointing) == (7, True)


def test_parse_size():
    assert memory.parse_size("24GB") == memory.parse_size("24 GiB") == 24 * GiB
    assert memory.parse_size("16000MiB") == 16000 * 1024**2
    with pytest.raises(QloraError):
        memory.parse_size("-3GB")


def test_targets_absent_from_the_family_are_refused():
    # Phi-3's q, k and v are one qkv_proj: q_proj,v_proj would plan no adapter (and, with DoRA,
    # crashed on an empty max()); the training run refuses the same targets
    arch = memory.resolve_arch(shape="phi-3-mini-4k")
    for dora in (False, True):
        with pytest.raises(QloraError, match=r"--targets \(qlora train: target_modules\): q_proj,v_proj "
                                             "match no linear layer of this phi3 model; use all-linear "
                                             "or some of qkv_proj"):
            plan(arch, PlanConfig(targets="q_proj,v_proj", dora=dora))
    assert plan(arch, PlanConfig(targets="qkv_proj", dora=True)).adapter_params > 0
    # a mixture of experts: its dense MLP names take none (the experts' names are offered), and
    # DoRA on the experts is refused as adapters.LoraExperts refuses it (it crashed on max())
    moe = memory.resolve_arch(shape="qwen3-30b-a3b")
    with pytest.raises(QloraError, match="some of q_proj, k_proj, v_proj, o_proj, "
                                         "experts.gate_up_proj, experts.down_proj"):
        plan(moe, PlanConfig(targets="gate_proj"))
    for targets in ("experts.down_proj", "all-linear"):
        with pytest.raises(QloraError, match="DoRA cannot adapt expert projections"):
            plan(moe, PlanConfig(targets=targets, dora=True))
    assert plan(moe, PlanConfig(targets="q_proj,v_proj", dora=True)).adapter_params > 0
    assert plan(moe, PlanConfig(targets="experts.down_proj")).adapter_params > 0


# --- what autograd keeps, counted on the CPU --------------------------------------------------
@pytest.mark.parametrize("family,targets,dropout,seeded", [
    ("qwen2", "all-linear", 0.0, False), ("qwen2", "all-linear", 0.1, False),
    ("llama", "q_proj,v_proj", 0.0, False), ("llama", "all-linear", 0.1, False),
    ("qwen2", "all-linear", 0.1, True), ("llama", "q_proj,v_proj", 0.1, True)])
def test_layer_saved_bytes_equal_what_autograd_keeps(family, targets, dropout, seeded):
    """seeded: the training loop's dropout (kernels/dropout.py), which keeps no mask."""
    """One decoder layer of our model (4-bit base, LoRA, bf16): the unique storages autograd saves,
    counted with saved_tensors_hooks, equal the planner's per-token terms x tokens + per-layer
    terms. The CPU's dropout keeps a bf16 noise tensor where CUDA keeps a bool mask."""
    from qlora.adapters import AdapterConfig, attach_adapters, seed_dropout
    from qlora.models.load import random_model
    from qlora.models.spec import spec_from_config
    from qlora.quant import QuantConfig

    config = dict(model_type=family, hidden_size=128, intermediate_size=352, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False,
                  max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0)
    r, tokens = 8, 64
    model = random_model(spec_from_config(config), QuantConfig(method="nf4", double_quant=True,
                                                                compute_dtype=torch.bfloat16))
    attach_adapters(model, AdapterConfig(r=r, alpha=16, dropout=dropout, target_modules=targets))
    model.train()
    seed = torch.zeros((), dtype=torch.int64)
    if seeded:
        seed_dropout(model, seed)
    x = model.model.embed_tokens(torch.randint(0, 300, (1, tokens))).detach().requires_grad_(True)
    cos, sin = model.model.rotary_emb(torch.arange(tokens)[None], x.dtype)
    saved = layer_saved_bytes(model.model.layers[0], x, cos, sin,
                              [*model.parameters(), *model.buffers(), seed, x, cos, sin])
    arch = arch_from_config(config)
    cfg = PlanConfig(r=r, lora_dropout=dropout, targets=targets, seq_len=tokens, alloc_rounding=False,
                     seeded_dropout=seeded)
    per_token = sum(memory.activations.layer_activation_terms(arch, cfg, dropout_mask_bytes=2).values())
    per_layer = sum(memory.weights.layer_weight_terms(arch, cfg).values())
    assert saved == per_token * tokens + per_layer


# Gemma's tiny shapes as tests/test_gemma.py builds them: head_dim (48) unlike hidden / heads (32),
# and for Gemma 2 the score soft-cap that sends attention through torch
GEMMA_TINY = dict(head_dim=48, query_pre_attn_scalar=24, sliding_window=16)


@pytest.mark.parametrize("family,extra,targets,dropout", [
    ("phi3", dict(pad_token_id=0), "all-linear", 0.0),
    ("phi3", dict(pad_token_id=0), "qkv_proj,down_proj", 0.1),
    ("gemma2", dict(GEMMA_TINY, attn_logit_softcapping=5.0, final_logit_softcapping=5.0), "all-linear", 0.0),
    ("gemma2", dict(GEMMA_TINY, attn_logit_softcapping=5.0), "q_proj,v_proj,gate_proj", 0.1),
    ("gemma3_text", dict(GEMMA_TINY, sliding_window_pattern=2), "all-linear", 0.1),
])
def test_family_layer_saved_bytes_equal_what_autograd_keeps(family, extra, targets, dropout):
    """As above, for the families with blocks of their own (a layer of full attention: its
    mask "causal"). What the planner counts beyond Llama's layer, each term checked here:
    - Phi-3: q and k rotated into new tensors, v a view of qkv_proj's output, whose whole
      storage ((heads + 2 kv heads) x head_dim, bf16) SDPA's saved v keeps: 2·(q + kv) +
      2·(q + 2kv) B/token where Llama keeps 2·(q + 2kv); silu(gate) kept on every path.
    - Gemma: four norms a block, each keeping its fp32 input (4h B/token), an fp32 rstd (4) and
      its fp32 scale (1 + w) (4h B a layer); Gemma 3 also its q/k norms; gelu(gate) kept.
    - Gemma 2's capped attention, in torch: q, and k and v repeated to all heads (3 x 2q
      B/token), each query's scores as tanh's bf16 output, the fp32 softmax and the bf16
      probabilities (8 B a score, heads x T scores a token) and the inverted bool mask (1 B a
      score): at this test's 4 heads and 64 tokens, 6q + 33·64 B/token, no log-sum-exp."""
    from qlora.adapters import AdapterConfig, attach_adapters
    from qlora.models.load import random_model
    from qlora.models.spec import spec_from_config
    from qlora.quant import QuantConfig

    config = dict(model_type=family, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False,
                  max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0, **extra)
    r, tokens = 8, 64
    model = random_model(spec_from_config(config), QuantConfig(method="nf4", double_quant=True,
                                                                compute_dtype=torch.bfloat16))
    attach_adapters(model, AdapterConfig(r=r, alpha=16, dropout=dropout, target_modules=targets))
    model.train()
    x = model.model.embed_tokens(torch.randint(0, 300, (1, tokens))).detach().requires_grad_(True)
    cos, sin = model.model.rotary_emb(torch.arange(tokens)[None], x.dtype)
    tables = [*cos.values(), *sin.values()] if isinstance(cos, dict) else [cos, sin]  # Gemma's, by window
    layer = model.model.layers[1]  # full attention in each of these configs
    saved = layer_saved_bytes(layer, x, cos, sin, [*model.parameters(), *model.buffers(), x, *tables])
    arch = arch_from_config(config)
    cfg = PlanConfig(r=r, lora_dropout=dropout, targets=targets, seq_len=tokens, alloc_rounding=False,
                     seeded_dropout=False)
    terms = memory.activations.layer_activation_terms(arch, cfg, dropout_mask_bytes=2)
    per_layer = sum(memory.weights.layer_weight_terms(arch, cfg).values())
    assert saved == sum(terms.values()) * tokens + per_layer
    if family == "gemma2":  # the capped attention's term, by the arithmetic above
        q = 4 * 48
        assert terms["q, k/v repeated, scores (capped, in torch)"] == 6 * q + (8 * 4 + 1) * tokens


def test_planner_counts_each_family_at_its_real_shape():
    """The family terms at the issue's target shapes, seq 2048, worked out by hand.
    Gemma-2-9B (16 heads, head_dim 256, q = 4096, kv = 2048): without fused kernels its capped
    attention runs in torch and keeps 6q + (8·16 + 1)·2048 = 24,576 + 264,192 B/token where flash
    would keep 2(q + 2kv) + 4·16 = 16,448 (o_proj's LoRA keeps the output, 2q, in both): the
    difference, 272,320 B/token, is 0.52 GiB a layer at 2048 tokens, alive in the recomputed
    layer's backward with checkpointing, and never kept for the rerun. With fused kernels it
    runs in flex_attention, which keeps what flash keeps: the capped model's terms are the
    uncapped one's, and kept for the rerun it is flash's 2(2q + 2kv) + 4·16 = 24,640 B/token.
    Phi-4: its rerun's dense weights are qkv_proj, o_proj and gate_up_proj (not Llama's
    names); its fork keeps attention for the rerun as Llama's does."""
    from qlora.models.spec import spec_from_config

    gemma = memory.resolve_arch(shape="gemma-2-9b")
    uncapped = spec_from_config(dict(memory.SHAPES["gemma-2-9b"], attn_logit_softcapping=None))
    # without dropout o_proj's LoRA keeps the attention output in both (with it, its copy)
    eager = PlanConfig(seq_len=2048, kernels="eager", lora_dropout=0.0)
    capped_terms = memory.activations.layer_activation_terms(gemma, eager)
    flash_terms = memory.activations.layer_activation_terms(uncapped, eager)
    assert sum(capped_terms.values()) - sum(flash_terms.values()) == 272_320
    keep = replace(eager, keep_attention=True)
    assert memory.attention.kept_attention_layers(gemma, keep) == 0  # dense capped scores: never kept
    assert any("gemma2's attention is recomputed" in n for n in plan(gemma, keep).notes)
    cfg = PlanConfig(seq_len=2048, kernels="fused")
    assert memory.activations.layer_activation_terms(gemma, cfg) == memory.activations.layer_activation_terms(uncapped, cfg)
    assert (memory.attention.kept_query_bytes_per_token(gemma)
            + memory.attention.kept_key_bytes_per_token(gemma, False)) == 2 * (4096 + 2 * 2048 + 4096) + 4 * 16
    # kept in every layer, the plan grows by that, 42 layers x 2048 tokens
    kept = plan(gemma, replace(cfg, keep_attention=True)).activations - plan(gemma, cfg).activations
    assert kept == 42 * 2048 * 24_640
    # the final soft-cap: inside the fused cross-entropy, whose peak is a 256-token chunk's
    # bf16 logits (2**26 / 256,000 vocab, down to a power of two), its fp32 losses and two bf16
    # [tokens, hidden]; the chunked reference loss keeps tanh's output too: 14 B an entry
    assert plan(gemma, cfg).loss == 2 * 256 * 256_000 + 4 * 256 + 2 * 2 * 2048 * 3584
    chunked = plan(gemma, replace(cfg, loss="chunked")).loss
    assert chunked == 14 * 256 * 256_000 + 4 * 2048 * 3584

    phi4 = memory.resolve_arch(shape="phi-4")
    qkv, o, gate_up = 5120 * (40 + 2 * 10) * 128, 5120 * 5120, 5120 * 2 * 17920
    b = plan(phi4, PlanConfig(seq_len=2048, kernels="fused", keep_attention=True))
    # inside a matmul: the largest weight (gate_up_proj) dequantized, bf16, + its fp32 absmax;
    # the rerun's dense weights of every linear but down_proj, kept for the layer's backward;
    # qkv_proj's not made at all, its attention kept in every layer
    assert b.dequant == 2 * gate_up + 4 * -(-gate_up // 64) + 2 * (o + gate_up)
    no_keep = plan(phi4, PlanConfig(seq_len=2048, kernels="fused"))
    assert no_keep.dequant == 2 * gate_up + 4 * -(-gate_up // 64) + 2 * (qkv + o + gate_up)
    assert memory.attention.kept_attention_layers(phi4, b.cfg) == 40
    kept = b.activations - plan(phi4, PlanConfig(seq_len=2048, kernels="fused")).activations
    assert kept == 40 * 2048 * (2 * (5120 + 2 * 1280 + 5120) + 4 * 40)
    # the fork copies v out of qkv_proj's output: attention keeps q, k, v, not the whole output
    assert "q, k, v (after RoPE)" in memory.activations.layer_activation_terms(phi4, b.cfg)
    # fused kernels: its norms fused, and its SwiGLU (FastPhi3MLP) keeps no silu(gate)
    assert "MLP: activation(gate)" not in memory.activations.layer_activation_terms(phi4, b.cfg)
    assert "MLP: activation(gate)" in memory.activations.layer_activation_terms(phi4, replace(b.cfg, kernels="eager"))
    assert "MLP: activation(gate)" not in memory.activations.layer_activation_terms(memory.resolve_arch(shape="llama-3-8b"), b.cfg)


def test_predictions_within_10_percent_of_every_gpu_measurement():
    """Every peak stored in benchmarks/results (this project's step on the H100) against the planner."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_calibration.py"
    spec = importlib.util.spec_from_file_location("memory_calibration", path)
    calib = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = calib  # its dataclass needs its module registered
    spec.loader.exec_module(calib)
    pts = calib.points()
    assert len(pts) >= 12 and {p.shape for p in pts} >= {"qwen2.5-1.5b", "llama-3-8b"}
    assert {p.seq for p in pts} >= {512, 2048, 8192} and {p.r for p in pts} == {16, 64}
    assert {p.checkpointing for p in pts} == {True, False}
    for p in pts:
        assert abs(p.error_pct()) <= 10, (p, p.predicted() / GiB)


# --- `qlora train` runs the planner first ----------------------------------------------------------
@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    import json

    from qlora.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("memory-train")
    model = build_tiny_model(root / "model", "llama", hidden_size=64, intermediate_size=128)
    rows = [{"instruction": "Repeat.", "input": w, "output": w} for w in
            ("alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta")]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, data


def _train_argv(model, data, out, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--output_dir", str(out), "--device", "cpu",
            "--quant", "none", "--max_steps", "1", "--logging_steps", "1", "--save_steps", "0", *extra]


def test_train_refuses_a_run_that_will_not_fit_before_loading(run_inputs, tmp_path, monkeypatch, capsys):
    from qlora.train import loop
    from qlora.train import model as train_model

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train_model, "build_model", no_loading)
    monkeypatch.setattr(loop, "load_data", no_loading)
    model, data = run_inputs
    rc = main(_train_argv(model, data, tmp_path / "run", "--gpu_memory", "1GB", "--max_seq_length", "4096",
                          "--micro_batch_size", "32", "--gradient_accumulation_steps", "1",
                          "--gradient_checkpointing", "false"))
    err = capsys.readouterr().err
    assert rc == 2 and "will not fit in 1.0 GiB" in err, err
    assert "--micro_batch_size 4" in err and "--max_seq_length" in err, err
    assert not (tmp_path / "run").exists()


def test_a_tight_fit_warns_and_goes_on_where_only_the_allocated_peak_fits(run_inputs, capsys):
    """Between the allocated peak (+ paged states + context) and the usual need (allocator slack
    on top), `qlora train` warns and goes on and `qlora plan` says "may fit"; below the allocated
    peak both refuse. Sizes in whole MiB around the plan's own bytes."""
    from qlora.config import RunConfig
    from qlora.errors import QloraError

    model, data = run_inputs
    cfg = RunConfig(model=str(model), data=str(data), quant="none", max_seq_length=8192,
                    keep_attention=False, offload_activations=False, tile_mlp=False)
    arch = memory.resolve_arch(model_dir=str(model))
    b = plan(arch, memory.plan_config_for_run(cfg))
    least, usual = memory.least_needed_bytes(b), memory.needed_bytes(b)
    assert least == b.allocated + b.optimizer_paged + memory.sizes.CUDA_CONTEXT_BYTES < usual
    tight = (least + usual) // 2 // 2**20
    assert memory.fits_tightly(b, tight * 2**20) and not memory.fits(b, tight * 2**20)
    logged = []
    resolved, _ = memory.check_run(replace(cfg, gpu_memory=f"{tight}MiB"), "cpu", log=logged.append)
    assert resolved.max_seq_length == 8192
    # the CUDA graph kept (its pool is planned with the step), the eager fallback said
    assert resolved.cuda_graphs and any(line.startswith("cuda_graphs: on (if capturing")
                                        for line in logged)
    roomy, _ = memory.check_run(replace(cfg, gpu_memory=f"{2 * usual // 2**20}MiB"), "cpu",
                                log=lambda _: None)
    assert roomy.cuda_graphs
    warning = next(line for line in logged if line.startswith("warning: may fit on --gpu_memory"))
    assert "tightly" in warning
    # every term of least_needed_bytes named with its size, so that the line adds up (this tiny
    # model's states are too small to be paged: a breakdown with 1 GiB of them names them too)
    assert f"leave ~{(tight * 2**20 - least) / 2**30:.2f} GiB" in warning, warning
    assert "paged" not in warning and b.optimizer_paged == 0
    paged = replace(b, optimizer_paged=2**30)
    assert "+ paged optimizer states ~1.00 GiB + CUDA context ~0.75 GiB leave ~1.00 GiB of" in \
        memory.tight_fit_line(paged, memory.least_needed_bytes(paged) + 2**30, "a GPU")
    # auto-fit picks only what fits comfortably; it says how to try the tight fit instead
    with pytest.raises(QloraError, match="may fit tightly.*leave out --auto_fit"):
        memory.check_run(replace(cfg, gpu_memory=f"{tight}MiB", auto_fit=True), "cpu",
                         log=logged.append)
    short = least // 2**20 - 1
    assert not memory.fits_tightly(b, short * 2**20)
    with pytest.raises(QloraError, match="will not fit"):
        memory.check_run(replace(cfg, gpu_memory=f"{short}MiB"), "cpu", log=logged.append)
    for size, said in ((tight, "may fit on"), (short, "does NOT fit")):
        assert main(["plan", "--model", str(model), "--seq-len", "8192", "--quant", "none",
                     "--gpu-memory", f"{size}MiB"]) == 0
        assert said in capsys.readouterr().out


def test_train_auto_fit_picks_micro_batch_and_checkpointing(run_inputs, tmp_path, capsys):
    from qlora.config import CONFIG_FILE_NAME, load_config

    model, data = run_inputs
    arch = memory.resolve_arch(model_dir=str(model))
    base = PlanConfig(quant="none", r=16, nonquant_dtype="fp32", seq_len=2048, micro_batch=1, checkpointing=True)
    # a GPU size where checkpointing off fits at some micro-batches of the 16 but not all of them
    need = [memory.needed_bytes(plan(arch, replace(base, checkpointing=False, micro_batch=m))) for m in (4, 8)]
    gpu_mib = (need[0] + need[1]) // 2 // 2**20
    expected = memory.auto_fit(arch, base, gpu_mib * 2**20, max_micro_batch=16)
    assert expected is not None and not expected.checkpointing and 4 <= expected.micro_batch < 8
    out = tmp_path / "run"
    rc = main(_train_argv(model, data, out, "--gpu_memory", f"{gpu_mib}MiB", "--auto_fit", "--max_seq_length", "2048",
                          "--micro_batch_size", "1", "--gradient_accumulation_steps", "16"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    saved = load_config(out / CONFIG_FILE_NAME)
    # the largest micro-batch that fits and divides the global batch of 16: 4
    assert (saved.micro_batch_size, saved.gradient_accumulation_steps) == (4, 4)
    assert saved.gradient_checkpointing is False and saved.auto_fit is False
    assert "auto-fit: micro-batch 4 x gradient accumulation 4" in (out / CONFIG_FILE_NAME).read_text()
    assert "auto-fit: micro-batch 4" in captured.out + captured.err


def test_out_of_memory_mid_run_keeps_a_checkpoint_and_advises(run_inputs, tmp_path, monkeypatch, capsys):
    from qlora.models.decoder import DecoderLM
    from qlora.train import checkpoint as ckpt

    calls = {"n": 0}
    forward = DecoderLM.forward

    def failing_forward(self, *args, **kwargs):
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:  # the third optimizer step (one micro-batch per step)
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(DecoderLM, "forward", failing_forward)
    model, data = run_inputs
    out = tmp_path / "run"
    argv = _train_argv(model, data, out, "--gpu_memory", "24GB", "--gradient_accumulation_steps", "1")
    argv[argv.index("--max_steps") + 1] = "5"
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "out of GPU memory during training: CUDA out of memory" in err
    kept = ckpt.list_checkpoints(out)
    assert [p.name for p in kept] == ["step-00000002"], kept
    assert f"checkpoint kept: {kept[0]}" in err
    assert "change one of" in err and "--max_seq_length" in err, err


def test_keep_attention_keeps_it_in_as_many_layers_as_the_plan_fits(run_inputs):
    """RunConfig.keep_attention None (the default): check_run keeps attention in every layer where
    that plan fits the GPU (each GPU's plan under torchrun), else in the last N for the largest N
    that fits, else in none (and on the CPU, with no GPU size, and under auto_fit). Asked for in
    more layers than fit, the run is refused with the count that fits."""
    from qlora.config import RunConfig
    from qlora.errors import QloraError

    model, data = run_inputs
    cfg = RunConfig(model=str(model), data=str(data), quant="none", max_seq_length=16384)
    arch = memory.resolve_arch(model_dir=str(model))
    layers = arch.num_layers
    assert layers >= 2
    pc = memory.plan_config_for_run(cfg)
    need = [memory.needed_bytes(plan(arch, replace(pc, keep_attention=n))) for n in range(layers + 1)]
    step = need[2] - need[1]
    assert step > 4 * 2**20 and all(b - a == step for a, b in zip(need[1:-1], need[2:-1]))
    # the plan grows by one layer's kept attention per layer from the second on (the last step
    # also drops the q/k/v weights the rerun no longer makes); the last layer's costs nothing at
    # this plan's peak, its own backward, where the rerun would have made the same tensors
    assert need[1] == need[0]
    assert plan(arch, replace(pc, keep_attention=True)).allocated == plan(
        arch, replace(pc, keep_attention=layers)).allocated
    logged = []
    for size, want in ((need[layers], True), (need[1] + step // 2, 1)):
        resolved, _ = memory.check_run(replace(cfg, gpu_memory=f"{size / 2**20}MiB"), "cpu", log=logged.append)
        assert resolved.keep_attention == want and type(resolved.keep_attention) is type(want), size
    assert any("keep_attention: on" in line for line in logged)
    assert any(f"keep_attention: 1 (the last 1 of {layers} layers'" in line for line in logged)
    assert memory.check_run(cfg, "cpu")[0].keep_attention is False  # no GPU: nothing to plan for
    assert memory.check_run(replace(cfg, keep_attention=layers), "cpu")[0].keep_attention == layers
    with pytest.raises(QloraError, match=f"keep_attention.*{layers + 1} layers.*has {layers}"):
        memory.check_run(replace(cfg, keep_attention=layers + 1), "cpu")  # before any loading
    # under torchrun the plan is each GPU's (tests/test_distributed*.py run it with 2 ranks)
    fits_all = replace(cfg, gpu_memory=f"{need[layers] / 2**20}MiB")
    ddp = memory.plan_config_for_run(fits_all, world_size=2)
    assert (ddp.gpus, ddp.sharding) == (2, "ddp")
    # data parallel: each GPU holds what one GPU does (the gradients are summed in place)
    assert memory.needed_bytes(plan(arch, replace(ddp, keep_attention=True))) == need[layers]
    fits_ddp = replace(cfg, gpu_memory=f"{memory.needed_bytes(plan(arch, replace(ddp, keep_attention=True))) / 2**20}MiB")
    assert memory.check_run(fits_ddp, "cpu", world_size=2, log=logged.append)[0].keep_attention is True
    assert memory.check_run(replace(fits_ddp, auto_fit=True), "cpu", log=logged.append)[0].keep_attention is False
    one_fits = replace(cfg, gpu_memory=f"{(need[1] + step // 2) / 2**20}MiB")
    for keep in (True, 2):
        with pytest.raises(QloraError, match="at most 1 layers.*set keep_attention: 1"):
            memory.check_run(replace(one_fits, keep_attention=keep), "cpu")
    with pytest.raises(QloraError, match=f"has {layers}"):
        memory.check_run(replace(fits_all, keep_attention=layers + 1), "cpu")


def test_out_of_memory_with_kept_attention_advises_turning_it_off_first(run_inputs):
    from qlora.config import RunConfig

    model, data = run_inputs
    cfg = RunConfig(model=str(model), data=str(data), quant="none", max_seq_length=8192,
                    gpu_memory="24GB", keep_attention=True)
    text = str(memory.out_of_memory_error(cfg, "cpu", RuntimeError("CUDA out of memory")))
    advice = text.split("change one of:")[1]
    assert advice.strip().startswith("keep_attention: false (~"), text
    off = str(memory.out_of_memory_error(replace(cfg, keep_attention=False), "cpu",
                                         RuntimeError("CUDA out of memory")))
    assert "keep_attention" not in off
