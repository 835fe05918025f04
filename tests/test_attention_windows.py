"""Attention windows per layer (ArchSpec.layer_windows), read from config.json as transformers
reads it, against transformers on tiny random models.

Every comparison is fp32 with a relative error of at most 1e-5: both sides run the same fp32
math on the same weights, and only the order of summation inside a matmul or softmax differs.
A layer windowed wrongly moves the logits by far more (0.95 relative on these models).

The windowed models have 2 layers, a window of 8 and inputs of 24 tokens, so a window hides
something from most tokens.
"""

from __future__ import annotations

import json
import types

import pytest
import torch

from conftest import LLAMA3_ROPE
from qlora.adapters import AdapterConfig, attach_adapters
from qlora.errors import QloraError
from qlora.infer import GenerationOptions, generate
from qlora.models import load_model, load_tokenizer, read_spec
from qlora.models.attention import layer_masks
from qlora.models.spec import spec_from_config
from qlora.quant import QuantConfig
from qlora.speed import SpeedPlan, apply_speed
from qlora.train import graphs

FP32 = torch.float32
WINDOW = 8
LENGTH = 24  # longer than the window
QWEN_WINDOWS = dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
ALTERNATING = ["full_attention", "sliding_attention"]

QWEN_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
             "rope_theta": 10000.0}
YARN_OPTIONS = {"rope_type": "yarn", "factor": 6.0, "original_max_position_embeddings": 32,
                "rope_theta": 5000.0, "beta_fast": 16, "beta_slow": 2, "mscale": 1.0,
                "mscale_all_dim": 0.5, "truncate": False}

# name → (family, config overrides, drop layer_types from config.json, each layer's window)
MODELS = {
    # as Qwen2.5's config.json on the hub, written before transformers saved layer_types:
    # the windows come from max_window_layers (layers from 1 on)
    "qwen2-max-window-layers": ("qwen2", QWEN_WINDOWS, True, (None, WINDOW)),
    "qwen3-max-window-layers": ("qwen3", QWEN_WINDOWS, True, (None, WINDOW)),
    # transformers saves the layer_types it derived; one given explicitly wins over them
    "qwen2-saved-layer-types": ("qwen2", QWEN_WINDOWS, False, (None, WINDOW)),
    "qwen2-explicit-layer-types": ("qwen2", dict(QWEN_WINDOWS, layer_types=ALTERNATING[::-1]),
                                   False, (WINDOW, None)),
    # transformers reads a mistral config.json with layer_types as Ministral's (they win);
    # without them Mistral windows every layer
    "mistral-layer-types": ("mistral", dict(sliding_window=WINDOW, layer_types=ALTERNATING),
                            False, (None, WINDOW)),
    "mistral-window": ("mistral", dict(sliding_window=WINDOW), False, (WINDOW, WINDOW)),
    # Llama's config keeps layer_types and a window, and its model ignores both (this one
    # passes on a single window too: it guards a family that must not read layer_types)
    "llama-layer-types-ignored": ("llama", dict(sliding_window=WINDOW, layer_types=ALTERNATING),
                                  False, (None, None)),
    # Mistral Nemo: head_dim 32, not hidden 64 / 4 heads; no window
    "mistral-nemo-head-dim": ("mistral", dict(head_dim=32, sliding_window=None), False,
                              (None, None)),
    "llama3-rope": ("llama", dict(rope_parameters=LLAMA3_ROPE), False, (None, None)),
    # YaRN as Qwen2.5's long-context config.json sets it, and with every option of its own
    "qwen2-yarn": ("qwen2", dict(rope_parameters=QWEN_YARN), False, (None, None)),
    "qwen3-yarn-options": ("qwen3", dict(rope_parameters=YARN_OPTIONS), False, (None, None)),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    from qlora.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("windows")
    built = {}
    for i, (name, (family, overrides, drop_layer_types, _)) in enumerate(MODELS.items()):
        path = build_tiny_model(root / name, family, seed=10 + i, **overrides)
        if drop_layer_types:
            config = json.loads((path / "config.json").read_text())
            del config["layer_types"]
            (path / "config.json").write_text(json.dumps(config))
        built[name] = path
    return built


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=FP32).eval()


def ours(path):
    return load_model(path, QuantConfig(method="none", compute_dtype=FP32))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def tokens(seed: int, batch: int = 2, length: int = LENGTH) -> torch.Tensor:
    return torch.randint(6, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- config.json → layer_windows ----------------------------------------------------------------

SHAPE = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             vocab_size=128)


@pytest.mark.parametrize("family, fields", [
    ("qwen2", dict(use_sliding_window=False, sliding_window=WINDOW)),
    ("qwen2", QWEN_WINDOWS),
    ("qwen2", dict(use_sliding_window=True, sliding_window=WINDOW)),  # max_window_layers 28
    ("qwen2", dict(QWEN_WINDOWS, layer_types=ALTERNATING[::-1])),
    ("qwen3", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0)),
    ("qwen3", dict(use_sliding_window=False, layer_types=["full_attention"] * 2)),
    ("mistral", dict(sliding_window=WINDOW)),
    ("mistral", dict(sliding_window=WINDOW, layer_types=ALTERNATING)),
    ("mistral", dict(sliding_window=None)),
    ("llama", dict(sliding_window=WINDOW, layer_types=ALTERNATING)),
])
def test_layer_windows_are_those_transformers_builds(tmp_path, family, fields):
    """The window transformers gives each layer of a config.json it reads: where its config
    class has layer_types (Qwen2, Qwen3, and Ministral's, which a mistral config.json with
    layer_types is read as), the layers named sliding get the window; plain Mistral's every
    layer gets it; Llama's none."""
    from transformers import AutoConfig

    cfg = dict(SHAPE, model_type=family, **fields)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    config = AutoConfig.from_pretrained(tmp_path)
    if config.model_type in ("qwen2", "qwen3", "ministral"):
        expected = tuple(config.sliding_window if kind == "sliding_attention" else None
                         for kind in config.layer_types)
    elif config.model_type == "mistral":
        expected = (config.sliding_window,) * 2
    else:
        expected = (None, None)
    assert spec_from_config(cfg).layer_windows == expected


@pytest.mark.parametrize("layer_types, message", [
    (["full_attention"], "lists 1 layers, but num_hidden_layers is 2"),
    (["full_attention", "chunked_attention"], "'chunked_attention' not supported"),
])
def test_bad_layer_types_are_named(layer_types, message):
    cfg = dict(SHAPE, model_type="qwen2", **QWEN_WINDOWS, layer_types=layer_types)
    with pytest.raises(QloraError, match=message):
        spec_from_config(cfg)


def test_sliding_layers_without_a_window_are_refused():
    """transformers fails on them when it builds the sliding layers' mask; we when reading."""
    cfg = dict(SHAPE, model_type="qwen2", use_sliding_window=False, layer_types=ALTERNATING)
    with pytest.raises(QloraError, match="no sliding window is in effect"):
        spec_from_config(cfg)


# --- logits --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_transformers(models, name):
    path = models[name]
    assert read_spec(path).layer_windows == MODELS[name][3]
    ids = tokens(1)
    with torch.no_grad():
        expected = hf_model(path)(ids).logits
        got = ours(path)(ids)
    assert rel_err(expected, got) <= 1e-5


def test_llama3_rope_past_the_original_context(models):
    """The llama3 variant's frequencies at positions past original_max_position_embeddings."""
    path = models["llama3-rope"]
    ids = tokens(2, batch=1, length=LLAMA3_ROPE["original_max_position_embeddings"] + 16)
    with torch.no_grad():
        assert rel_err(hf_model(path)(ids).logits, ours(path)(ids)) <= 1e-5


@pytest.mark.parametrize("name", ["qwen2-yarn", "qwen3-yarn-options"])
def test_yarn_rope_is_transformers_past_the_original_context(models, name):
    """YaRN's frequencies and attention factor are transformers' (its rope init function for
    the same config), and so are the logits at positions past original_max_position_embeddings,
    where its interpolated dimensions matter."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from qlora.models.spec import rope_inverse_frequencies

    path = models[name]
    want, want_factor = ROPE_INIT_FUNCTIONS["yarn"](AutoConfig.from_pretrained(path), "cpu")
    got, factor = rope_inverse_frequencies(read_spec(path))
    assert factor == pytest.approx(want_factor, rel=1e-12) and factor != 1.0
    assert rel_err(want, got) <= 1e-6  # fp32: inv_freq / factor against 1 / (factor · base^x)
    ids = tokens(2, batch=1, length=MODELS[name][1]["rope_parameters"]
                 ["original_max_position_embeddings"] + 16)
    with torch.no_grad():
        assert rel_err(hf_model(path)(ids).logits, ours(path)(ids)) <= 1e-5


def test_each_distinct_window_gets_one_mask_shared_by_its_layers():
    positions = torch.arange(LENGTH).expand(2, LENGTH)
    masks = layer_masks((None, WINDOW, None, WINDOW), positions, past=0)
    assert masks[0] == "causal" and masks[2] is masks[0]
    assert masks[1].shape == (2, 1, LENGTH, LENGTH) and masks[3] is masks[1]
    # a window no shorter than the row hides nothing: every layer gets the full mask
    short = layer_masks((None, WINDOW), positions[:, :WINDOW], past=0)
    assert short == ["causal", "causal"]


# --- packed rows and generation ------------------------------------------------------------------

def test_packed_rows_equal_each_document_alone(models):
    """Documents packed in a row (positions restarting at 0), each longer than the window but one:
    their logits are transformers' for each document alone, and the loss is their sum."""
    path = models["qwen2-max-window-layers"]
    model, ref = ours(path), hf_model(path)
    docs = [tokens(3, 1, 19)[0], tokens(4, 1, 6)[0], tokens(5, 1, 13)[0]]
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    labels = ids.clone()
    starts = [0, 19, 25]
    labels[0, starts] = -100
    with torch.no_grad():
        packed = model(ids, position_ids=positions)
        packed_loss = model(ids, position_ids=positions, labels=labels)
        alone_loss = 0
        for start, doc in zip(starts, docs):
            expected = ref(doc[None]).logits[0]
            assert rel_err(expected, packed[0, start:start + len(doc)]) <= 1e-5
            doc_labels = doc.clone()
            doc_labels[0] = -100
            alone_loss = alone_loss + model(doc[None], labels=doc_labels[None])
    torch.testing.assert_close(packed_loss, alone_loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["qwen2-max-window-layers", "qwen3-max-window-layers"])
def test_greedy_generation_past_the_window_matches_transformers(models, name):
    """Through the KV cache, the windowed layer sees only the last 8 tokens at every step."""
    path = models[name]
    prompt = load_tokenizer(path)("Once upon a time")["input_ids"]
    got = generate(ours(path), prompt, GenerationOptions(max_new_tokens=24))
    out = hf_model(path).generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
    assert len(prompt) + 24 > 2 * WINDOW
    assert got == out[0, len(prompt):].tolist()


# --- the speed layer -----------------------------------------------------------------------------

def test_fast_path_forks_window_each_layer_as_the_reference(models):
    """The forks (checkpointed layers, attention kept for the rerun) give the reference's loss
    and adapter gradients, and that loss is transformers' (adapters start as the identity)."""
    path = models["qwen2-max-window-layers"]
    ids = tokens(6)
    with torch.no_grad():
        logits = hf_model(path)(ids).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1), reduction="sum")
    model = ours(path)
    attach_adapters(model, AdapterConfig(r=4, alpha=8, dropout=0.0))
    model.train()
    runs = []
    for plan, checkpointing in ((None, False), (SpeedPlan(seeded_dropout=True,
                                                          keep_attention=True), True)):
        if plan is not None:
            apply_speed(model, plan)
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        loss = model(ids, labels=ids)
        loss.backward()
        runs.append((loss.detach(), [p.grad.clone() for p in model.parameters()
                                     if p.requires_grad]))
    assert type(model).__name__ == "FastDecoderLM"
    assert rel_err(expected, runs[0][0]) <= 1e-5
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-5, atol=1e-5)
    for fast, reference in zip(runs[1][1], runs[0][1]):
        torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-6)


def test_cuda_graphs_take_a_window_where_varlen_does(models, monkeypatch):
    """A window shorter than the rows stops the graphs only where torch's varlen attention
    cannot take it (packed rows would need a dense mask read from their positions)."""
    spec = read_spec(models["qwen2-max-window-layers"])
    model = types.SimpleNamespace(spec=spec, layers_use_rng=False)
    cuda = torch.device("cuda")
    monkeypatch.setattr(graphs, "varlen_available", lambda device: True)
    monkeypatch.setattr(graphs, "varlen_takes_window", lambda: True)
    assert graphs.unsupported_reason(model, cuda, 2048) is None
    monkeypatch.setattr(graphs, "varlen_takes_window", lambda: False)
    assert "window (8)" in graphs.unsupported_reason(model, cuda, 2048)
    assert graphs.unsupported_reason(model, cuda, WINDOW) is None
    unwindowed = types.SimpleNamespace(spec=read_spec(models["llama3-rope"]), layers_use_rng=False)
    assert graphs.unsupported_reason(unwindowed, cuda, 2048) is None
    # long rows run eagerly, whatever the model
    assert graphs.unsupported_reason(unwindowed, cuda, graphs.GRAPH_ROWS_UP_TO) is None
    assert "rows of 32768 tokens" in graphs.unsupported_reason(unwindowed, cuda, 32768)
