"""`qlora export --gguf`: read back with gguf's own reader, every tensor and key there, values right.

Error bounds, RMS(dequantized − source) / RMS(source) per tensor (measured on these random weights
in brackets): F32 exact · F16 1e-3 (3e-4) · BF16 5e-3 (2e-3) · Q8_0 1e-2 (5e-3) · Q6_K 3e-2 (1.7e-2)
· Q5_K 5e-2 (3.6e-2) · Q4_K 0.1 (7e-2) · Q4_0 0.12 (8.6e-2) · Q3_K 0.18 (0.14) · Q2_K 0.32 (0.27).
The k-quant blocks themselves are checked in test_export_kquants.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tokenizers
import torch

gguf = pytest.importorskip("gguf")

from conftest import LLAMA3_ROPE  # noqa: E402
from qlora.errors import QloraError  # noqa: E402
from qlora.export.gguf import export_gguf, permute_rope, unpermute_rope  # noqa: E402
from qlora.tiny import build_tiny_model  # noqa: E402

T = gguf.GGMLQuantizationType
BOUND = {T.F32: 0.0, T.F16: 1e-3, T.BF16: 5e-3, T.Q8_0: 1e-2, T.Q6_K: 3e-2, T.Q5_K: 5e-2,
         T.Q4_K: 0.1, T.Q4_0: 0.12, T.Q3_K: 0.18, T.Q2_K: 0.32}
SIZES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
PER_LAYER = {
    "llama": ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"],
}
PER_LAYER["mistral"] = PER_LAYER["llama"]
PER_LAYER["qwen2"] = PER_LAYER["llama"] + ["attn_q.bias", "attn_k.bias", "attn_v.bias"]
PER_LAYER["qwen3"] = PER_LAYER["llama"] + ["attn_q_norm", "attn_k_norm"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    extra = {"qwen3": {"head_dim": 64}}
    return {f: build_tiny_model(root / f, f, **SIZES, **extra.get(f, {})) for f in ARCH}


def _source(model_dir):
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(str(model_dir / "model.safetensors")).items()}


def _field(reader, key):
    return reader.fields[key].contents()


def _hf_name(gguf_name):
    """llama.cpp name → HF name, written out here independently of the export's mapping."""
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    if gguf_name in fixed:
        return fixed[gguf_name]
    _, i, part, kind = gguf_name.split(".")
    hf = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}[part]
    return f"model.layers.{i}.{hf}.{kind}"


def _rel_rms(got, want):
    return float(np.sqrt(((got - want) ** 2).mean()) / max(np.sqrt((want**2).mean()), 1e-30))


CASES = [(f, q) for f in ("llama", "qwen2", "qwen3") for q in ("f16", "bf16", "q8_0", "q4_0", "q4_k_m")]
CASES += [("mistral", "f16"), ("mistral", "q4_k_m")]  # exported as llama: two types suffice
CASES += [("llama", q) for q in ("q2_k", "q3_k_m", "q4_k_s", "q5_k_s", "q5_k_m", "q6_k")]
DEFAULT_TYPE = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q2_k": T.Q2_K,
                "q3_k_m": T.Q3_K, "q4_k_s": T.Q4_K, "q4_k_m": T.Q4_K, "q5_k_s": T.Q5_K,
                "q5_k_m": T.Q5_K, "q6_k": T.Q6_K}


@pytest.mark.parametrize("family,qtype", CASES)
def test_export_reads_back(models, tmp_path, family, qtype):
    model = models[family]
    out = export_gguf(model, tmp_path / "m.gguf", qtype)
    r = gguf.GGUFReader(str(out))
    config = json.loads((model / "config.json").read_text())
    arch = ARCH[family]

    # metadata llama.cpp reads
    assert _field(r, "general.architecture") == arch
    assert _field(r, f"{arch}.context_length") == config["max_position_embeddings"]
    assert _field(r, f"{arch}.embedding_length") == config["hidden_size"]
    assert _field(r, f"{arch}.block_count") == config["num_hidden_layers"]
    assert _field(r, f"{arch}.feed_forward_length") == config["intermediate_size"]
    assert _field(r, f"{arch}.attention.head_count") == config["num_attention_heads"]
    assert _field(r, f"{arch}.attention.head_count_kv") == config["num_key_value_heads"]
    assert _field(r, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    assert _field(r, f"{arch}.rope.freq_base") == pytest.approx(config["rope_parameters"]["rope_theta"])
    assert _field(r, "tokenizer.ggml.model") == "gpt2"
    tok = json.loads((model / "tokenizer.json").read_text())
    vocab = {**tok["model"]["vocab"], **{a["content"]: a["id"] for a in tok["added_tokens"]}}
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == config["vocab_size"]
    # normal tokens of this char-level (not byte-level) vocab are written as GPT-2 byte-level text,
    # which is how llama.cpp's gpt2 model reads them; the tokenizers library's ByteLevel gives it
    byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    added = {a["content"] for a in tok["added_tokens"]}
    assert all(tokens[i] == (t if t in added else byte_level.pre_tokenize_str(t)[0][0])
               for t, i in vocab.items())
    assert tokens[vocab[" "]] == "\u0120" and tokens[vocab["\n"]] == "\u010a"
    types = _field(r, "tokenizer.ggml.token_type")
    assert types[vocab["<|im_start|>"]] == gguf.TokenType.CONTROL and types[vocab["a"]] == gguf.TokenType.NORMAL
    assert "tokenizer.ggml.merges" in r.fields
    assert _field(r, "tokenizer.ggml.bos_token_id") == config["bos_token_id"]
    assert _field(r, "tokenizer.ggml.eos_token_id") == config["eos_token_id"]
    assert _field(r, "tokenizer.ggml.padding_token_id") == config["pad_token_id"]
    # the chat template ends a turn with <|im_end|>, not EOS: said, so llama.cpp stops there
    assert _field(r, "tokenizer.ggml.eot_token_id") == vocab["<|im_end|>"]
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    template = tok_cfg.get("chat_template") or (model / "chat_template.jinja").read_text()
    assert _field(r, "tokenizer.chat_template") == template

    # every tensor, under llama.cpp's names, within its type's error
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{p}" + ("" if p.endswith(".bias") else ".weight")
        for i in range(config["num_hidden_layers"]) for p in PER_LAYER[family]}
    assert {t.name for t in r.tensors} == expected
    src = _source(model)
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    for t in r.tensors:
        want = src[_hf_name(t.name)]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        if arch == "llama" and ".attn_q." in t.name:
            got = unpermute_rope(got, n_head)
        elif arch == "llama" and ".attn_k." in t.name:
            got = unpermute_rope(got, n_kv)
        if want.ndim == 1:
            assert t.tensor_type == T.F32
        assert _rel_rms(got, want) <= BOUND[t.tensor_type], (t.name, t.tensor_type.name, _rel_rms(got, want))

    kinds = {t.name: t.tensor_type for t in r.tensors}
    assert _field(r, "general.file_type") == gguf.LlamaFileType["MOSTLY_" + qtype.upper()]
    assert kinds["blk.0.ffn_up.weight"] == DEFAULT_TYPE[qtype]  # the mixtures: test_export_kquants.py
    if qtype == "q4_k_m":  # llama.cpp's rule with 2 layers: output and layer 1's attn_v/ffn_down
        assert kinds["output.weight"] == T.Q6_K and kinds["token_embd.weight"] == T.Q4_K
        assert kinds["blk.0.attn_v.weight"] == T.Q4_K and kinds["blk.1.attn_v.weight"] == T.Q6_K
        assert kinds["blk.0.ffn_down.weight"] == T.Q4_K and kinds["blk.1.ffn_down.weight"] == T.Q6_K
        assert kinds["blk.0.attn_q.weight"] == T.Q4_K


def test_the_pre_tokenizer_is_named_by_the_regex_it_splits_by():
    """llama.cpp's pre-tokenizer name for tokenizer.json's shape: a lone ByteLevel splitting by
    GPT-2's regex (GPT-NeoX-20B's tokenizer, which Pythia and OLMo use) is "gpt-2" whatever the
    family; Llama 3's ignore_merges BPE "llama-bpe"; a ByteLevel after digit splits, or one not
    splitting, none of those."""
    from qlora.export.gguf import pre_tokenizer_name

    def name(pre, model_type="gpt_neox", **model):
        return pre_tokenizer_name({"pre_tokenizer": pre, "model": model},
                                  {"model_type": model_type}, spm=False)

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert name(byte_level) == name(byte_level, "olmo") == name(byte_level, "granite") == "gpt-2"
    assert name({**byte_level, "use_regex": False}) == "default"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits"}, byte_level]}
    assert name(digits, "llama", ignore_merges=True) == "llama-bpe"
    assert name(digits) == "default"
    assert name(None, "gpt2") == "default" and name(digits, "gpt2") == "gpt-2"


def test_rope_permutation_matches_llama_cpp_rotation(models):
    """HF rotates (i, i+d/2) pairs; ggml's llama rope rotates (2i, 2i+1). With the permuted weights
    the attention scores must come out the same."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    src = _source(models["llama"])
    wq, wk = src["model.layers.0.self_attn.q_proj.weight"], src["model.layers.0.self_attn.k_proj.weight"]
    n_head, n_kv, d, seq = 4, 2, 64, 5
    rng = np.random.default_rng(0)
    x = rng.standard_normal((seq, 256)).astype(np.float32)
    pos = np.arange(seq)[:, None]
    theta = pos * 10000.0 ** (-np.arange(0, d, 2) / d)  # (seq, d/2)

    def hf(w, heads):
        q = torch.from_numpy((x @ w.T).reshape(seq, heads, d)).transpose(0, 1)[None]  # 1,H,T,D
        cos = torch.from_numpy(np.cos(np.concatenate([theta, theta], -1)))[None].float()
        sin = torch.from_numpy(np.sin(np.concatenate([theta, theta], -1)))[None].float()
        return apply_rotary_pos_emb(q, q, cos, sin)[0][0].numpy()  # H,T,D

    def ggml(w, heads):
        q = (x @ w.T).reshape(seq, heads, d // 2, 2)
        c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
        a, b = q[..., 0], q[..., 1]
        return np.stack([a * c - b * s, a * s + b * c], -1).reshape(seq, heads, d).transpose(1, 0, 2)

    q_hf, k_hf = hf(wq, n_head), hf(wk, n_kv)
    q_gg, k_gg = ggml(permute_rope(wq, n_head), n_head), ggml(permute_rope(wk, n_kv), n_kv)
    scores_hf = np.einsum("htd,hsd->hts", q_hf, np.repeat(k_hf, 2, 0))
    scores_gg = np.einsum("htd,hsd->hts", q_gg, np.repeat(k_gg, 2, 0))
    np.testing.assert_allclose(scores_gg, scores_hf, rtol=1e-4, atol=1e-6)
    # without the permutation they differ (the test can fail)
    q_bad = ggml(wq, n_head)
    assert not np.allclose(np.einsum("htd,hsd->hts", q_bad, np.repeat(ggml(wk, n_kv), 2, 0)), scores_hf, atol=1e-3)


def test_adapter_export_equals_merged_export(models, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from qlora.merge import merge_adapter

    model = models["qwen2"]
    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    p = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for n, w in p.named_parameters():
            if "lora_B" in n:
                w.normal_(0, 0.05)
    p.save_pretrained(str(tmp_path / "ad"))
    a = export_gguf(model, tmp_path / "a.gguf", "f16", adapter_dir=tmp_path / "ad")
    merged = merge_adapter(model, tmp_path / "ad", tmp_path / "merged", dtype="float32")
    b = export_gguf(merged, tmp_path / "b.gguf", "f16")
    ta = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(a)).tensors}
    tb = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(b)).tensors}
    plain = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(export_gguf(model, tmp_path / "c.gguf"))).tensors}
    assert ta.keys() == tb.keys()
    assert all(np.array_equal(ta[k], tb[k]) for k in ta)
    assert not np.array_equal(ta["blk.0.attn_q.weight"], plain["blk.0.attn_q.weight"])
    # named after the base and the adapter, not after the temporary folder of the merge
    name = gguf.GGUFReader(str(a)).fields["general.name"]
    assert bytes(name.parts[name.data[0]]).decode() == f"{model.name} + ad"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.gguf", "ad", "b.gguf", "c.gguf", "merged"]


def test_a_window_llama_cpp_does_not_apply_is_said(models, tmp_path):
    """llama.cpp runs Mistral as llama, and Qwen2 as qwen2, without a sliding window: a window
    shorter than the context is noted; Mistral's default one (4096, past these models' 512
    positions) and Qwen's turned off (use_sliding_window false, the default) are not."""
    windowed = {"mistral": build_tiny_model(tmp_path / "mistral", "mistral", sliding_window=16),
                "qwen2": build_tiny_model(tmp_path / "qwen2", "qwen2", use_sliding_window=True,
                                          sliding_window=16, max_window_layers=1)}
    for family, model in windowed.items():
        for source, notes in ((model, 1), (models[family], 0)):
            lines = []
            export_gguf(source, tmp_path / f"{family}-{notes}.gguf", "f16", log=lines.append)
            said = [ln for ln in lines if "without its sliding window of 16 tokens" in ln]
            assert len(said) == notes, (family, lines)


def test_yarn_rope_is_written_as_llama_cpp_reads_it(tmp_path):
    """Qwen2.5's long-context YaRN: llama.cpp's yarn type, factor, original context and betas;
    without a factor, the context's ratio to the original (as transformers); settings that would
    change llama.cpp's attention factor are refused, leaving no file."""
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
            "rope_theta": 10000.0, "beta_fast": 16.0}
    model = build_tiny_model(tmp_path / "yarn", "qwen2", **SIZES, rope_parameters=rope)
    export_gguf(model, tmp_path / "yarn.gguf", "f16")
    reader = gguf.GGUFReader(str(tmp_path / "yarn.gguf"))
    assert _field(reader, "qwen2.rope.scaling.type") == "yarn"
    assert _field(reader, "qwen2.rope.scaling.factor") == 4.0
    assert _field(reader, "qwen2.rope.scaling.original_context_length") == 64
    assert _field(reader, "qwen2.rope.scaling.yarn_beta_fast") == 16.0
    config_path = model / "config.json"
    config = json.loads(config_path.read_text())
    config["rope_parameters"] = {k: v for k, v in rope.items() if k != "factor"}
    config_path.write_text(json.dumps(config))
    export_gguf(model, tmp_path / "ratio.gguf", "f16")
    context = config["max_position_embeddings"]
    assert _field(gguf.GGUFReader(str(tmp_path / "ratio.gguf")),
                  "qwen2.rope.scaling.factor") == pytest.approx(context / 64)
    config["rope_parameters"] = dict(rope, mscale=1.0, mscale_all_dim=0.5)
    config_path.write_text(json.dumps(config))
    with pytest.raises(QloraError, match=r"yarn's mscale: 1.0, mscale_all_dim: 0.5 has no GGUF"):
        export_gguf(model, tmp_path / "refused.gguf", "f16")
    assert not (tmp_path / "refused.gguf").exists()


def test_llama3_rope_factors_give_transformers_frequencies(tmp_path):
    """Llama 3.x rope scaling: llama.cpp divides each base frequency theta^(-2i/d) by
    rope_freqs[i], so those quotients must be transformers' own llama3 inv_freq. With head_dim 64
    and an original context of 64, frequencies fall in all three bands (3 kept, 3 blended, the
    rest divided by the factor). A model without llama3 scaling stores no rope_freqs."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model = build_tiny_model(tmp_path / "llama3", "llama", **SIZES, rope_parameters=LLAMA3_ROPE)
    reader = gguf.GGUFReader(str(export_gguf(model, tmp_path / "llama3.gguf", "f16")))
    (freqs,) = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
    assert freqs.tensor_type == T.F32
    factors = np.array(freqs.data, np.float64)
    head_dim = SIZES["hidden_size"] // SIZES["num_attention_heads"]
    assert factors.shape == (head_dim // 2,)
    assert (factors == 1).sum() == 3 and (factors == 8).sum() == head_dim // 2 - 6
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.from_pretrained(model), "cpu")
    base = LLAMA3_ROPE["rope_theta"] ** (-np.arange(0, head_dim, 2) / head_dim)
    # both sides fp32 (transformers' inv_freq, our stored factors): a few roundings, rel 1e-6
    np.testing.assert_allclose(base / factors, want.double().numpy(), rtol=1e-6, atol=0)

    config = json.loads((model / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": LLAMA3_ROPE["rope_theta"]}
    (model / "config.json").write_text(json.dumps(config))
    plain = gguf.GGUFReader(str(export_gguf(model, tmp_path / "plain.gguf", "f16")))
    assert "rope_freqs.weight" not in {t.name for t in plain.tensors}


def test_bad_inputs(models, tmp_path):
    model = models["llama"]
    (tmp_path / "exists.gguf").write_bytes(b"mine")
    with pytest.raises(QloraError, match="exists"):
        export_gguf(model, tmp_path / "exists.gguf", "f16")
    assert (tmp_path / "exists.gguf").read_bytes() == b"mine"
    with pytest.raises(QloraError, match="--type"):
        export_gguf(model, tmp_path / "x.gguf", "q3_k")
    with pytest.raises(QloraError, match="no such directory"):
        export_gguf(tmp_path / "nope", tmp_path / "x.gguf")
    odd = tmp_path / "odd"
    odd.mkdir()
    cfg = json.loads((model / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**cfg, "model_type": "phi"}))
    (odd / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    with pytest.raises(QloraError, match="model_type 'phi'"):
        export_gguf(odd, tmp_path / "x.gguf")
    with pytest.raises(QloraError, match="adapter_config.json"):
        export_gguf(model, tmp_path / "x.gguf", adapter_dir=odd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.gguf", "odd"]


def test_cli_export(models, tmp_path, capsys):
    from qlora.cli import main

    out = tmp_path / "m.gguf"
    args = ["export", "--gguf", "--model", str(models["qwen3"]), "--out", str(out), "--type", "q4_k_m"]
    assert main(args) == 0
    assert "GGUF written" in capsys.readouterr().out
    assert main(args) == 2
    # GGUF is the one format: --gguf may be left out, and the file is the same
    bare = tmp_path / "bare.gguf"
    assert main([a if a != str(out) else str(bare) for a in args if a != "--gguf"]) == 0
    assert bare.read_bytes() == out.read_bytes()


@pytest.mark.parametrize("qtype", ["q4_k_m", "q8_0", "q4_0", "bf16", "f16"])
def test_worker_processes_write_the_same_file(models, tmp_path, monkeypatch, qtype):
    """The export on worker processes (chunks through mapped files, one tensor in flight) writes
    the bytes the export in this process writes: the k-quants and the types gguf.quants encodes."""
    from qlora.export import kquants

    monkeypatch.setattr(kquants, "CHUNK_BLOCKS", 64)  # tiny tensors (256-512 blocks): shared out all the same
    monkeypatch.setattr(kquants, "GGUF_TASK_VALUES", 32 * 256)  # and in tasks of a few rows
    inline = export_gguf(models["llama"], tmp_path / "a.gguf", qtype, threads=1, device="cpu")
    workers = export_gguf(models["llama"], tmp_path / "b.gguf", qtype, threads=2, device="cpu")
    assert inline.read_bytes() == workers.read_bytes()
    with pytest.raises(QloraError, match="--threads 0"):
        export_gguf(models["llama"], tmp_path / "c.gguf", qtype, threads=0)


@pytest.mark.parametrize("qtype", ["q4_k_m", "q8_0"])
def test_bf16_weights_reach_the_workers_as_bits_and_write_the_same_file(models, tmp_path, monkeypatch, qtype):
    """A bf16 checkpoint's matrices go to the worker processes as their 16-bit patterns (half the
    bytes for the exporting process to write), widened there: the file is the one their float32
    values give (a k-quant and a type gguf.quants encodes)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from qlora.export import gguf as gguf_export
    from qlora.export import kquants

    model = tmp_path / "bf16"
    shutil.copytree(models["llama"], model)
    weights = load_file(str(model / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, str(model / "model.safetensors"))
    monkeypatch.setattr(kquants, "CHUNK_BLOCKS", 64)  # tiny tensors: shared out all the same
    monkeypatch.setattr(kquants, "GGUF_TASK_VALUES", 32 * 256)
    handed, to_bits = [], kquants.bf16_bits
    monkeypatch.setattr(kquants, "bf16_bits", lambda t: handed.append(t.shape) or to_bits(t))
    bits = export_gguf(model, tmp_path / "bits.gguf", qtype, threads=2, device="cpu")
    assert len(handed) == sum(v.dim() == 2 for v in weights.values())  # every matrix; no norm (F32)
    monkeypatch.setattr(gguf_export, "_host_values", lambda t, stored, quantize_on: t.float().numpy())
    floats = export_gguf(model, tmp_path / "floats.gguf", qtype, threads=2, device="cpu")
    assert bits.read_bytes() == floats.read_bytes()


@pytest.mark.parametrize("qtype", ["q4_k_m", "q8_0", "q4_0", "bf16", "f16"])
def test_the_torch_search_writes_the_same_file(models, tmp_path, monkeypatch, qtype):
    """The export quantizing in torch (what runs on a GPU; here torch on the CPU, in tasks smaller
    than a tensor) writes the numpy export's bytes, and says which ran."""
    from qlora.export import gguf as gguf_export
    from qlora.export import kquants_torch

    monkeypatch.setattr(kquants_torch, "DEVICE_CHUNK_VALUES", 64 * 256)
    lines = []
    numpy_file = export_gguf(models["llama"], tmp_path / "a.gguf", qtype, threads=1, device="cpu",
                             log=lines.append)
    monkeypatch.setattr(gguf_export, "quantizer", lambda device, threads: kquants_torch.OnDevice("cpu"))
    torch_file = export_gguf(models["llama"], tmp_path / "b.gguf", qtype, log=lines.append)
    assert lines == ["quantizing: numpy in this process", "quantizing: torch on cpu (CPU)"]
    assert numpy_file.read_bytes() == torch_file.read_bytes()
