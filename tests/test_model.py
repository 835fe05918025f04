"""The model layer against transformers and bitsandbytes: logits, quantized bytes, generation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import VARIANTS, fp32_bnb_reference, reference_attention
from qlora.errors import QloraError
from qlora.infer import GenerationOptions, generate
from qlora.models import load_model, load_tokenizer, read_spec
from qlora.quant import QuantConfig

FP32 = torch.float32


def hf_model(path, **kwargs):
    from transformers import AutoModelForCausalLM

    kwargs = {**reference_attention(path), **kwargs}
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=FP32, **kwargs).eval()


def hf_4bit(path, quant_type: str, double_quant: bool):
    from transformers import BitsAndBytesConfig

    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                    bnb_4bit_use_double_quant=double_quant,
                                    bnb_4bit_compute_dtype=FP32)
    return fp32_bnb_reference(hf_model(path, quantization_config=bnb_config, device_map="cpu"))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def token_batch(seed: int = 0, batch: int = 2, length: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(6, 128, (batch, length), generator=g)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers_16bit(tiny_models, variant):
    path = tiny_models[variant]
    ids = token_batch()
    ours = load_model(path, QuantConfig(method="none", compute_dtype=FP32))
    with torch.no_grad():
        expected = hf_model(path)(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    assert rel_err(expected, got) <= 1e-5


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen2-window", "qwen3",
                                     "mistral-window", "mistral-nemo-head-dim"])
def test_4bit_bytes_and_logits_match_bitsandbytes(tiny_models, variant, quant_type, double_quant):
    path = tiny_models[variant]
    ref = hf_4bit(path, quant_type, double_quant)
    ours = load_model(path, QuantConfig(method=quant_type, double_quant=double_quant,
                                        compute_dtype=FP32))
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    quantized = [k for k in ref_state if k.endswith("q_proj.weight") or ".weight." in k]
    assert quantized, "transformers produced no quantized tensors"
    for key in quantized:
        assert key in our_state, key
        a, b = ref_state[key], our_state[key]
        assert a.dtype == b.dtype and torch.equal(a, b), f"{key} differs from bitsandbytes' bytes"
    q = ours.model.layers[0].self_attn.q_proj.weight
    assert q.dtype == torch.uint8 and q.quant_state.quant_type == quant_type
    assert (q.quant_state.state2 is not None) == double_quant
    ids = token_batch(1)
    with torch.no_grad():
        assert rel_err(ref(ids).logits, ours(ids)) <= 1e-4


def test_norms_embeddings_head_stay_in_compute_dtype(llama_dir):
    model = load_model(llama_dir, QuantConfig(compute_dtype=torch.bfloat16))
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    assert model(token_batch()).dtype == torch.bfloat16


def test_prequantized_checkpoint_loads_without_requantizing(tiny_models, tmp_path):
    ref = hf_4bit(tiny_models["qwen2"], "nf4", True)
    saved = tmp_path / "qwen2-bnb-4bit"
    ref.save_pretrained(saved)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_models["qwen2"] / name, saved / name)
    keys = json.dumps(json.loads((saved / "config.json").read_text())["quantization_config"])
    assert "bitsandbytes" in keys
    import bitsandbytes as bnb

    calls = []
    original = bnb.functional.quantize_4bit
    bnb.functional.quantize_4bit = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        ours = load_model(saved, QuantConfig(compute_dtype=FP32))
    finally:
        bnb.functional.quantize_4bit = original
    assert not calls, "a pre-quantized checkpoint was quantized again"
    for key, tensor in ref.state_dict().items():
        if ".weight" in key and "proj" in key:
            assert torch.equal(tensor, ours.state_dict()[key]), key
    ids = token_batch(2)
    with torch.no_grad():
        assert rel_err(ref(ids).logits, ours(ids)) <= 1e-4


def test_sharded_checkpoint_streams(tmp_path):
    from qlora.tiny import build_tiny_model

    path = build_tiny_model(tmp_path / "sharded", "llama", max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 2
    ours = load_model(path, QuantConfig(method="nf4", compute_dtype=FP32))
    ids = token_batch()
    with torch.no_grad():
        assert rel_err(hf_4bit(path, "nf4", True)(ids).logits, ours(ids)) <= 1e-4


def test_a_tensor_in_two_shards_is_read_as_transformers_reads_it_or_refused(tmp_path):
    """A tensor stored in two shards of a checkpoint: transformers reads every tensor of every
    shard, a later copy over an earlier, whatever the index says. Where the index names that
    last shard too, ours reads that copy (the logits are transformers'), in the loader and in the
    headers merge and export go by; where the index names the other shard, or neither, the copy
    read would depend on the tool: a QloraError names the tensor and both shards."""
    from safetensors.torch import load_file, save_file

    from qlora.models.weights import read_headers
    from qlora.tiny import build_tiny_model

    path = build_tiny_model(tmp_path / "dup", "llama", max_shard_size="100KB")
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    key = "model.layers.0.self_attn.q_proj.weight"
    first, last = index["weight_map"][key], shards[-1]
    assert first != last
    tensors = load_file(str(path / last))
    tensors[key] = load_file(str(path / first))[key] + 0.5  # another copy, far from the first
    save_file(tensors, str(path / last), metadata={"format": "pt"})
    quant = QuantConfig(method="none", compute_dtype=FP32)

    refused = rf"tensor {key} is in 2 shards \({first}, {last}\) with different values and the index names {first}; transformers reads the copy in {last}"
    with pytest.raises(QloraError, match=refused):
        load_model(path, quant)
    with pytest.raises(QloraError, match=refused):
        read_headers(path)
    del index["weight_map"][key]
    index_file.write_text(json.dumps(index))
    with pytest.raises(QloraError, match=rf"{key} is in 2 shards .* the index does not name it"):
        load_model(path, quant)

    index["weight_map"][key] = last
    index_file.write_text(json.dumps(index))
    assert read_headers(path).tensors[key].file.name == last
    ids = token_batch()
    with torch.no_grad():
        # the reference path's tolerance (test_logits_match_transformers_16bit)
        assert rel_err(hf_model(path)(ids).logits, load_model(path, quant)(ids)) <= 1e-5


def test_a_tensor_stored_twice_alike_loads_whatever_the_index_names(tmp_path):
    """The same bytes in two shards (the index naming the first, or not naming it): every tool
    reads the same values, whichever copy it takes, so nothing is ambiguous: the checkpoint
    loads (the logits are transformers', which reads it) and merge's headers take one copy."""
    from safetensors.torch import load_file, save_file

    from qlora.models.weights import read_headers
    from qlora.tiny import build_tiny_model

    path = build_tiny_model(tmp_path / "dup", "llama", max_shard_size="100KB")
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    key = "model.layers.0.self_attn.q_proj.weight"
    first, last = index["weight_map"][key], sorted(set(index["weight_map"].values()))[-1]
    assert first != last
    tensors = load_file(str(path / last))
    tensors[key] = load_file(str(path / first))[key]  # the same tensor, stored a second time
    save_file(tensors, str(path / last), metadata={"format": "pt"})
    quant = QuantConfig(method="none", compute_dtype=FP32)
    ids = token_batch()
    for named in (first, None):
        if named is None:
            del index["weight_map"][key]
            index_file.write_text(json.dumps(index))
        headers = read_headers(path)
        # read from the last shard holding it, as transformers reads it (a later copy over an earlier)
        assert headers.tensors[key].file.name == last
        with torch.no_grad():
            # the reference path's tolerance (test_logits_match_transformers_16bit)
            assert rel_err(hf_model(path)(ids).logits, load_model(path, quant)(ids)) <= 1e-5


def test_copies_alike_compares_every_chunk_dtype_and_shape(tmp_path, monkeypatch):
    """weights.copies_alike: alike only with one dtype, one shape and every byte the same, the
    last chunk's too (chunks of 7 bytes here, so a 40-byte tensor takes several)."""
    from safetensors.torch import save_file

    from qlora.models import weights

    monkeypatch.setattr(weights, "COMPARE_CHUNK_BYTES", 7)
    x = torch.arange(10, dtype=torch.float32)
    last_differs = x.clone()
    last_differs[-1] = 11.0
    copies = {"same": x, "moved": x, "other": torch.zeros(3), "last": last_differs,
              "int": x.view(torch.int32), "shape": x.view(2, 5)}
    files = {}
    for name, t in copies.items():
        files[name] = tmp_path / f"{name}.safetensors"
        # another tensor before it, longer in "moved": the copy at another offset of its file
        save_file({"w": t, "a": torch.ones(5 if name == "moved" else 1)}, str(files[name]))
    assert weights.copies_alike("w", [files["same"], files["moved"], files["same"]])
    for name in ("other", "last", "int", "shape"):
        assert not weights.copies_alike("w", [files["same"], files[name]]), name


def test_int8_base_runs_close_to_16bit(llama_dir):
    ids = token_batch()
    ours = load_model(llama_dir, QuantConfig(method="int8", compute_dtype=FP32))
    with torch.no_grad():
        expected = hf_model(llama_dir)(ids).logits
        got = ours(ids).float()
    # LLM.int8 rounds each row to 127 levels: close to, not equal to, the 16-bit logits
    assert rel_err(expected, got) < 0.05


def test_packed_rows_equal_examples_run_one_by_one(llama_dir):
    model = load_model(llama_dir, QuantConfig(method="nf4", compute_dtype=FP32))
    docs = [token_batch(3, 1, 7)[0], token_batch(4, 1, 12)[0], token_batch(5, 1, 5)[0]]
    separate = []
    for doc in docs:
        labels = doc.clone()
        labels[0] = -100
        with torch.no_grad():
            separate.append(model(doc[None], labels=labels[None]))
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    labels = ids.clone()
    starts = torch.cumsum(torch.tensor([0] + [len(d) for d in docs[:-1]]), 0)
    labels[0, starts] = -100
    with torch.no_grad():
        packed = model(ids, position_ids=positions, labels=labels)
        packed_logits = model(ids, position_ids=positions)
        alone = model(docs[1][None])
    torch.testing.assert_close(packed, sum(separate), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_logits[0, 7:19], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["llama", "qwen3", "mistral-window", "qwen2-window",
                                     "gemma2", "gemma3"])
def test_greedy_generation_matches_transformers(tiny_models, variant):
    path = tiny_models[variant]
    tok = load_tokenizer(path)
    prompt = tok("Once upon a time")["input_ids"]
    ours = load_model(path, QuantConfig(method="none", compute_dtype=FP32))
    got = generate(ours, prompt, GenerationOptions(max_new_tokens=24))
    ref = hf_model(path)
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                       eos_token_id=None, pad_token_id=0)
    assert got == out[0, len(prompt):].tolist()


def test_generation_with_penalty_and_stop_on_eos(llama_dir):
    tok = load_tokenizer(llama_dir)
    prompt = tok("abc abc abc")["input_ids"]
    ours = load_model(llama_dir, QuantConfig(method="none", compute_dtype=FP32))
    ref = hf_model(llama_dir)
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                       repetition_penalty=1.3, eos_token_id=None, pad_token_id=0)
    opts = GenerationOptions(max_new_tokens=16, repetition_penalty=1.3)
    assert generate(ours, prompt, opts) == out[0, len(prompt):].tolist()
    first = generate(ours, prompt, GenerationOptions(max_new_tokens=16))[3]
    stopped = generate(ours, prompt, GenerationOptions(max_new_tokens=16, eos_token_ids=(first,)))
    assert stopped[-1] == first and len(stopped) <= 4


def test_sampling_is_seeded_and_respects_top_k(llama_dir):
    tok = load_tokenizer(llama_dir)
    prompt = tok("hello")["input_ids"]
    ours = load_model(llama_dir, QuantConfig(method="nf4", compute_dtype=FP32))
    opts = GenerationOptions(max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=5, seed=7)
    assert generate(ours, prompt, opts) == generate(ours, prompt, opts)
    greedy = GenerationOptions(max_new_tokens=12)
    top1 = GenerationOptions(max_new_tokens=12, temperature=1.0, top_k=1, seed=3)
    assert generate(ours, prompt, top1) == generate(ours, prompt, greedy)


# --- bad inputs ---------------------------------------------------------------------------------

def test_missing_config_is_named(tmp_path):
    with pytest.raises(QloraError, match="config.json"):
        load_model(tmp_path)


def test_unknown_model_type_lists_supported(llama_dir, tmp_path):
    bad = tmp_path / "gpt2ish"
    shutil.copytree(llama_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(QloraError, match=r"'gpt2'.*llama, mistral, qwen2, qwen3, gemma2, gemma3_text"):
        read_spec(bad)


def test_missing_tokenizer_is_named(llama_dir, tmp_path):
    bad = tmp_path / "no-tokenizer"
    shutil.copytree(llama_dir, bad)
    (bad / "tokenizer.json").unlink()
    with pytest.raises(QloraError, match="tokenizer.json"):
        load_tokenizer(bad)


def test_truncated_shard_is_named(llama_dir, tmp_path):
    bad = tmp_path / "truncated"
    shutil.copytree(llama_dir, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(QloraError, match="model.safetensors.*truncated"):
        load_model(bad, QuantConfig(compute_dtype=FP32))


def test_config_weights_disagreement_is_named(llama_dir, tmp_path):
    bad = tmp_path / "wrong-config"
    shutil.copytree(llama_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(QloraError, match="shape"):
        load_model(bad, QuantConfig(compute_dtype=FP32))


def test_unknown_quant_method_is_refused():
    with pytest.raises(QloraError, match="nf4, fp4, int8, none"):
        QuantConfig(method="nf3")


def test_loading_holds_one_16bit_weight_at_a_time(tmp_path, monkeypatch):
    """Streaming: a block linear's 16-bit weight is gone (quantized, freed) before the next is read."""
    import gc
    import logging
    import weakref

    import qlora.models.load as load
    from qlora.tiny import build_tiny_model

    path = build_tiny_model(tmp_path / "sharded", "llama", max_shard_size="40KB")
    alive: list[weakref.ref] = []
    most = 0
    read = load._read

    def spy(handle, file, key):
        nonlocal most
        gc.collect()
        alive[:] = [r for r in alive if r() is not None]
        most = max(most, len(alive))
        tensor = read(handle, file, key)
        if load.BLOCK_LINEAR.match(key.removesuffix(".weight")):
            alive.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(load, "_read", spy)
    # pytest keeps log records with their tracebacks (and so the frames and tensors in them);
    # bitsandbytes logs one on its first CPU matmul set-up
    logging.disable(logging.CRITICAL)
    try:
        model = load.load_model(path, QuantConfig(method="nf4", compute_dtype=FP32))
    finally:
        logging.disable(logging.NOTSET)
    assert most == 0, f"{most} earlier 16-bit weights were still alive when the next was read"
    assert sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit") == 14


def test_remote_code_is_never_executed(llama_dir, tmp_path):
    """A checkpoint that ships custom code (auto_map) loads through our own classes only."""
    repo = tmp_path / "remote-code"
    shutil.copytree(llama_dir, repo)
    marker = tmp_path / "executed"
    (repo / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                  "from transformers import PreTrainedTokenizerFast as Tok\n")
    for name, key in (("config.json", "AutoModelForCausalLM"), ("tokenizer_config.json", "AutoTokenizer")):
        data = json.loads((repo / name).read_text())
        data["auto_map"] = {key: "evil.Tok" if key == "AutoTokenizer" else "evil.Model"}
        (repo / name).write_text(json.dumps(data))
    model = load_model(repo, QuantConfig(method="nf4", compute_dtype=FP32))
    tok = load_tokenizer(repo)
    assert tok("ab")["input_ids"] and model(token_batch()).shape[-1] == 128
    assert not marker.exists()


def test_int8_layer_holds_bitsandbytes_codes_and_scales():
    """Our 8-bit layer quantizes with int8_vectorwise_quant on the target device (bitsandbytes'
    Int8Params quantizes only when moved off the CPU, so a weight already on the GPU stayed 16-bit:
    measured 16.4 GB of weights at Llama-3-8B, 9.4 GB since). Here, on the CPU: the same codes and
    scales as bitsandbytes' own CPU→device path, and its matmul. The GPU case itself is shown by
    measure_memory.py's static memory (docs/COMPARE.md), not by this test."""
    import bitsandbytes as bnb

    from qlora.quant import quantize_linear

    torch.manual_seed(0)
    weight = torch.randn(48, 64, dtype=torch.bfloat16)
    layer = quantize_linear(weight, None, QuantConfig(method="int8", compute_dtype=torch.bfloat16), "cpu")
    assert layer.weight.dtype == torch.int8
    reference = bnb.nn.Int8Params(weight.to(torch.float16), requires_grad=False,
                                  has_fp16_weights=False).to("cpu")  # the CPU→device path
    assert torch.equal(layer.weight.data, reference.data)
    assert torch.equal(layer.weight.SCB, reference.SCB)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    dense = (reference.data.float() * reference.SCB.float().unsqueeze(1) / 127).to(torch.bfloat16)
    assert torch.allclose(layer(x).float(), (x @ dense.t()).float(), rtol=0.05, atol=0.05)


def test_int8_layer_backward_equals_bitsandbytes_and_keeps_nothing_for_checkpointing():
    """Our frozen 8-bit layer: bitsandbytes' forward and input gradient exactly, and nothing but the
    module left for backward (bitsandbytes' own autograd keeps the fp16 input on its context,
    which gradient checkpointing cannot drop)."""
    import bitsandbytes as bnb

    from qlora.quant import quantize_linear

    torch.manual_seed(1)
    weight = torch.randn(40, 64, dtype=torch.bfloat16)
    ours = quantize_linear(weight, None, QuantConfig(method="int8", compute_dtype=torch.bfloat16), "cpu")
    theirs = bnb.nn.Linear8bitLt(64, 40, bias=False, has_fp16_weights=False, threshold=6.0)
    theirs.weight = bnb.nn.Int8Params(weight.to(torch.float16), requires_grad=False,
                                      has_fp16_weights=False).to("cpu")
    assert isinstance(ours, bnb.nn.Linear8bitLt)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    x[0, 0, 3] = 9.0  # an outlier column: LLM.int8's 16-bit side path
    grad_out = torch.randn(2, 5, 40, dtype=torch.bfloat16)
    results = []
    for layer in (ours, theirs):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        # a custom Function's grad_fn is its context: the tensors it holds live until backward
        held = [t for v in vars(y.grad_fn).values()
                for t in (v if isinstance(v, (tuple, list)) else [v]) if isinstance(t, torch.Tensor)]
        y.backward(grad_out)
        results.append((y.detach(), xi.grad, held))
    (y_ours, g_ours, held_ours), (y_bnb, g_bnb, _) = results
    assert torch.equal(y_ours, y_bnb)
    assert torch.equal(g_ours, g_bnb)
    assert held_ours == []  # (on CUDA bitsandbytes' MatMul8bitLt holds its input here; the CPU
    # takes its dequantizing MatMul8bitFp path instead, so the leak itself shows only on the GPU)
