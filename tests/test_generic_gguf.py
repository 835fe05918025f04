"""GGUF export of the generic path's architectures that llama.cpp runs (export/gguf_generic.py).

Each tiny random model of tests/test_generic.py (gpt2, gemma, olmo, granite, gpt_neox) gets an
adapter trained-like on the generic path (our LoRA layers, random B, saved as PEFT saves it: for
GPT-2's Conv1D layers, fan_in_fan_out) and is exported with it; the file is read back with gguf's
own GGUFReader and held to what llama.cpp's loader reads (src/models/ARCH.cpp):
- the architecture and the hyper-parameters, each equal to config.json's own key (GPT-2 names
  them n_embd, n_layer...; OLMo's LayerNorm has no eps key: transformers fixes 1e-5);
- every tensor's name (gguf's TensorNameMap of the model's module path) and its shape in ggml's
  order as llama.cpp creates it ({n_embd, n_vocab} for token_embd...);
- each tensor's values equal to PEFT's merge_and_unload of the same adapter on transformers'
  model, once the layout llama.cpp reads is undone by this file's own index arithmetic: GPT-2's
  Conv1D weights transposed, GPT-NeoX's fused qkv rows regrouped from per head to [q | k | v],
  OLMo's and Granite's q/k rows interleaved per head (llama.cpp's NORM rope rotates adjacent
  pairs), Gemma's norms stored as 1 + w.
Tolerances: f16 files round each value once (2^-11 relative; 1 ulp allowed for PEFT's fp32
rounding against ours); q8_0 within its block error (RMS 1e-2 of the tensor's). A transform left
out or applied twice moves values by the weights' own size.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from qlora.errors import QloraError

from test_generic import NONE, SIZES, build_generic, hf_model, randomize_b, with_config

TYPES = ("f16", "q8_0")
GGUF_ARCH = {"gpt2": "gpt2", "gemma": "gemma", "olmo": "olmo", "granite": "granite",
             "gpt_neox": "gptneox"}


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """model_type → (model dir, adapter dir, PEFT's merged state dict)."""
    from peft import PeftModel

    from qlora.adapters import AdapterConfig, attach_adapters, save_adapter
    from qlora.models import load_model

    root = tmp_path_factory.mktemp("generic-gguf")
    out = {}
    for i, model_type in enumerate(SIZES):
        path = build_generic(root / model_type, model_type, seed=i)
        ours = load_model(path, NONE)
        attach_adapters(ours, AdapterConfig(r=4, alpha=8, dropout=0.0))
        randomize_b(ours, seed=i + 1)
        save_adapter(ours, root / f"{model_type}-adapter", str(path))
        merged = PeftModel.from_pretrained(hf_model(path), root / f"{model_type}-adapter")
        state = {k: v.detach().numpy() for k, v in merged.merge_and_unload().state_dict().items()}
        out[model_type] = (path, root / f"{model_type}-adapter", state)
    return out


@pytest.fixture(scope="module")
def exported(adapted, tmp_path_factory):
    """(model_type, file type) → the GGUF file, exported with its adapter."""
    from qlora.export.gguf import export_gguf

    root = tmp_path_factory.mktemp("generic-gguf-files")
    return {(t, q): export_gguf(path, root / f"{t}-{q}.gguf", q, adapter_dir=adapter,
                                log=lambda line: None, threads=1)
            for t, (path, adapter, _) in adapted.items() for q in TYPES}


def read(gguf_file):
    import gguf

    return gguf.GGUFReader(str(gguf_file))


def field(reader, key):
    return reader.fields[key].contents() if key in reader.fields else None


# --- hyper-parameters ---------------------------------------------------------------------------
def expected_hparams(model_type: str, c: dict) -> dict:
    """llama.cpp's keys (without the architecture's prefix) from config.json's own names."""
    if model_type == "gpt2":
        return {"block_count": c["n_layer"], "embedding_length": c["n_embd"],
                "feed_forward_length": 4 * c["n_embd"], "context_length": c["n_positions"],
                "attention.head_count": c["n_head"], "attention.head_count_kv": c["n_head"],
                "attention.layer_norm_epsilon": c["layer_norm_epsilon"],
                "rope.dimension_count": None}  # learned positions
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    common = {"block_count": c["num_hidden_layers"], "embedding_length": c["hidden_size"],
              "feed_forward_length": c["intermediate_size"],
              "context_length": c["max_position_embeddings"],
              "attention.head_count": c["num_attention_heads"],
              "attention.head_count_kv": c.get("num_key_value_heads", c["num_attention_heads"]),
              "attention.key_length": head_dim, "rope.dimension_count": head_dim,
              "rope.freq_base": c["rope_parameters"]["rope_theta"]}
    if model_type == "gpt_neox":
        partial = c["rope_parameters"]["partial_rotary_factor"]
        return {**common, "rope.dimension_count": int(head_dim * partial),
                "attention.layer_norm_epsilon": c["layer_norm_eps"],
                "use_parallel_residual": c["use_parallel_residual"]}
    if model_type == "olmo":
        return {**common, "attention.layer_norm_epsilon": 1e-5, "attention.clamp_kqv": None}
    rms = {**common, "attention.layer_norm_rms_epsilon": c["rms_norm_eps"]}
    if model_type == "granite":
        return {**rms, "embedding_scale": c["embedding_multiplier"],
                "residual_scale": c["residual_multiplier"],
                "attention.scale": c["attention_multiplier"], "logit_scale": c["logits_scaling"]}
    return rms


@pytest.mark.parametrize("model_type", list(SIZES))
def test_architecture_and_hyper_parameters_are_config_jsons(adapted, exported, model_type):
    path = adapted[model_type][0]
    config = json.loads((path / "config.json").read_text())
    reader = read(exported[model_type, "f16"])
    arch = GGUF_ARCH[model_type]
    assert field(reader, "general.architecture") == arch
    for key, want in expected_hparams(model_type, config).items():
        got = field(reader, f"{arch}.{key}")
        if want is None or isinstance(want, (bool, int)):
            assert got == want, key
        else:
            # stored as float32: within 2^-24 (6e-8) of the value, relatively
            assert got == pytest.approx(want, rel=1e-7), key
    assert field(reader, f"{arch}.vocab_size") == config["vocab_size"]
    assert len(field(reader, "tokenizer.ggml.tokens")) == config["vocab_size"]


# --- tensors --------------------------------------------------------------------------------------
def llama_cpp_shape(role: str, kind: str, h: dict) -> tuple[int, ...]:
    """The shape (ggml order: the input dimension first) llama.cpp's create_tensor asks of a
    tensor of `role`; `h` the model's sizes."""
    e, q, kv, ff = h["hidden"], h["heads"] * h["head_dim"], h["kv_heads"] * h["head_dim"], h["ff"]
    weights = {"token_embd": (e, h["vocab"]), "output": (e, h["vocab"]),
               "position_embd": (e, h["context"]), "attn_qkv": (e, q + 2 * kv),
               "attn_q": (e, q), "attn_k": (e, kv), "attn_v": (e, kv), "attn_output": (q, e),
               "ffn_up": (e, ff), "ffn_gate": (e, ff), "ffn_down": (ff, e)}
    if role in weights:
        return weights[role] if kind == "weight" else weights[role][1:]
    return (e,)  # norms, their biases


def sizes_of(path) -> dict:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(str(path))  # GPT-2's n_embd read as hidden_size...
    heads = c.num_attention_heads
    return dict(hidden=c.hidden_size, heads=heads,
                kv_heads=getattr(c, "num_key_value_heads", heads),
                head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
                ff=getattr(c, "intermediate_size", None) or 4 * c.hidden_size,
                vocab=c.vocab_size, context=c.max_position_embeddings)


def gguf_layout(name: str, w: np.ndarray, model_type: str, h: dict) -> np.ndarray:
    """A merged transformers tensor as llama.cpp reads it (numpy's order: [out, in])."""
    if model_type == "gpt2" and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
        return w.T  # Conv1D stores [in, out]
    if model_type == "gpt_neox" and "query_key_value" in name:
        d = h["head_dim"]  # rows grouped per head [q k v] → every q, every k, every v
        rows = [head * 3 * d + part * d + i
                for part in range(3) for head in range(h["heads"]) for i in range(d)]
        return w[rows]
    heads = {"q_proj.weight": h["heads"], "k_proj.weight": h["kv_heads"]}
    for suffix, n in heads.items():
        if model_type in ("olmo", "granite") and name.endswith(suffix):
            d = h["head_dim"]  # rotate-half pairs (i, i + d/2) → adjacent rows (2i, 2i + 1)
            return w[[head * d + half * (d // 2) + i
                      for head in range(n) for i in range(d // 2) for half in (0, 1)]]
    if model_type == "gemma" and name.endswith("norm.weight"):
        return w + 1.0
    return w


def merged_tensors(model_type: str, state: dict) -> dict[str, tuple[str, np.ndarray]]:
    """GGUF name → (transformers' name, merged tensor) of every tensor the file should hold,
    named by gguf's own TensorNameMap; a tied head is not stored (llama.cpp reads the embedding)."""
    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == GGUF_ARCH[model_type])
    n_layer = 2
    tmap = gguf.get_tensor_name_map(arch, n_layer)
    tied = model_type in ("gpt2", "gemma")
    out = {}
    for name, w in state.items():
        if tied and name == "lm_head.weight":
            continue
        gguf_name = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        out[gguf_name] = (name, w)
    return out


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("model_type", list(SIZES))
def test_tensors_are_the_merged_weights_as_llama_cpp_reads_them(adapted, exported, model_type,
                                                                qtype):
    from gguf.quants import dequantize

    path, _, state = adapted[model_type]
    h = sizes_of(path)
    expected = merged_tensors(model_type, state)
    reader = read(exported[model_type, qtype])
    assert {t.name for t in reader.tensors} == set(expected)
    for t in reader.tensors:
        role, kind = t.name.rsplit(".", 1)
        shape = tuple(int(n) for n in t.shape)
        assert shape == llama_cpp_shape(role.split(".")[-1], kind, h), t.name
        name, w = expected[t.name]
        want = gguf_layout(name, w, model_type, h).astype(np.float32)
        got = dequantize(t.data, t.tensor_type).reshape(want.shape)
        if t.tensor_type.name == "F32":  # the checkpoint's fp32 values, as they are
            np.testing.assert_array_equal(got, want, err_msg=t.name)
        elif t.tensor_type.name == "F16":  # f16 files
            np.testing.assert_allclose(got, want, rtol=2**-10, atol=1e-7, err_msg=t.name)
        else:
            assert qtype == "q8_0" and t.tensor_type.name == "Q8_0", t.name
            # Q8_0: a block of 32 rounds to steps of amax/127, an error of RMS step/sqrt(12);
            # amax is ~2-2.5 sigma in 32 normal values: ~0.005 of the values' RMS, 0.0054 seen
            rms = np.sqrt(((got - want) ** 2).mean() / (want**2).mean())
            assert rms < 1e-2, t.name
    if qtype == "q8_0":  # every weight matrix in Q8_0 (the rows here are whole blocks of 32)
        assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2
                and not t.name.startswith("position_embd")} == {"Q8_0"}
    if model_type == "gpt2":  # llama.cpp never quantizes learned positions: F32
        assert next(t for t in reader.tensors if t.name == "position_embd.weight"
                    ).tensor_type.name == "F32"


def test_the_adapter_changes_every_linear_it_targets(adapted):
    """The merged weights differ from the base's wherever a LoRA layer was: the tensors compared
    above carry the adapter (GPT-2's transposed Conv1D ones too)."""
    from safetensors.numpy import load_file

    for model_type, (path, _, state) in adapted.items():
        base = load_file(str(path / "model.safetensors"))
        linear = [k for k in state if k.endswith("weight") and any(
            part in k for part in ("proj", "c_attn", "c_fc", "query_key_value", "dense"))]
        assert linear, model_type
        for name in linear:
            assert not np.allclose(base[name], state[name]), (model_type, name)


@pytest.mark.parametrize("model_type", list(SIZES))
def test_check_reads_the_file_back_into_the_checkpoints_layout(adapted, exported, model_type):
    """check.gguf_state_dict (what `--check-engine qlora` runs) undoes every layout step: the
    source checkpoint's names and shapes, the merged values."""
    from qlora.export.check import gguf_state_dict

    path, _, state = adapted[model_type]
    from safetensors.numpy import load_file

    got = gguf_state_dict(exported[model_type, "f16"], path)
    assert set(got) == set(load_file(str(path / "model.safetensors")))  # every tensor, its name
    for name, t in got.items():
        want = state[name.replace("embed_out", "lm_head")]
        np.testing.assert_allclose(t.numpy(), want, rtol=2**-10, atol=1e-7, err_msg=name)


# --- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type, changes, says", [
    ("olmo", {"attention_bias": True}, "attention_bias = True"),
    ("granite", {"mlp_bias": True}, "mlp_bias = True"),
    ("gemma", {"tie_word_embeddings": False}, "tie_word_embeddings = False"),
    ("gpt2", {"activation_function": "relu"}, "activation_function = 'relu'"),
    ("gpt_neox", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4,
                                      "partial_rotary_factor": 0.25}}, "rope scaling"),
])
def test_settings_llama_cpp_computes_otherwise_are_refused(adapted, tmp_path, model_type,
                                                           changes, says):
    from qlora.export.gguf import export_gguf

    odd = with_config(adapted[model_type][0], tmp_path / model_type, **changes)
    with pytest.raises(QloraError, match="config.json") as err:
        export_gguf(odd, tmp_path / "m.gguf", "f16")
    assert says in str(err.value) and model_type in str(err.value)
    assert not (tmp_path / "m.gguf").exists()


def test_an_importance_matrix_is_refused_on_the_generic_path(adapted, tmp_path, capsys):
    """The importance matrix hooks the native decoder's linears: refused before any forward."""
    from qlora.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello there"}\n')
    rc = main(["export", "--gguf", "--model", str(adapted["olmo"][0]), "--out",
               str(tmp_path / "m.gguf"), "--type", "q4_k_m", "--imatrix-data", str(data),
               "--no-check"])
    err = capsys.readouterr().err
    assert rc == 2 and "--imatrix-data" in err and "'olmo'" in err and "generic path" in err
    assert not (tmp_path / "m.gguf").exists()
