"""The generic path: any causal LM that transformers builds itself, with transformers' own modules.

The reference decoder (decoder.py) implements four families. Any other config.json whose
model_type transformers implements (never remote code) is built here with
AutoModelForCausalLM.from_config, its parameters on the meta device, and its safetensors streamed
in as load.py streams a native checkpoint: each linear layer is quantized by quant.quantize_linear
(the bitsandbytes layers the reference uses) as soon as its weight is read; embeddings, norms and
the output head stay in the compute dtype. `GenericLM` puts the interface the rest of qlora uses
for DecoderLM around it (forward with labels → summed loss, new_cache for generation,
gradient_checkpointing, `spec` facts) and keeps transformers' module names, which are PEFT's.

What it costs against the native families: none of the speed layer applies (speed/ forks the
reference's classes, not transformers'): no fused kernels, no 4-bit fast path, no CUDA graphs; the
loss reads logits made whole ([tokens, vocab] in the compute dtype), as transformers does; the
memory planner can only estimate coarsely from the parameter count.

GPT-2's Conv1D holds its weight transposed ([in, out]). It is quantized as the [out, in] linear it
computes (transformers + bitsandbytes do the same), so once loaded every linear of the model is an
ordinary [out, in] layer; `LinearLayer.transposed` remembers which were Conv1D in the checkpoint,
for merge (which folds adapters into those transposed) and for the adapter config (PEFT's
fan_in_fan_out).

Mixtures of experts (Qwen2-MoE, OLMoE, and the other model types transformers loads by the same
conversion): transformers 5 holds a layer's experts as one 3D parameter per projection
(experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]), while the Hub's files, and
transformers' own save_pretrained, store one tensor per expert. generic_checkpoint.py's
`read_plan` groups those tensors by the parameter they make; as they stream in, a parameter's
tensors are held until its last one is read, then transformers' own WeightConverter of the
model's conversion mapping (MergeModulelist, Concatenate) is run over them (`convert_sources`):
one layer's experts in memory at a time. The
stacked experts are not linear layers: they get no adapters and stay in the compute dtype under a
4-bit base, as with transformers + bitsandbytes, which the log says. Where config.json's
output_router_logits asks, the loss adds the router's load-balancing loss, transformers' own
function, as the native MoeLM adds its own. Merge writes the experts under their stored names,
which transformers stacks again as it loads.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from qlora.errors import QloraError
from qlora.models.decoder import IGNORE_INDEX, compute_device, labelled_rows, shifted_targets
from qlora.models.families.moe_blocks import real_token_weights
from qlora.models.generic_checkpoint import checkpoint_names, convert_sources, read_plan
from qlora.models.spec import read_config
from qlora.models.weights import (check_nothing_missing, open_shard, read_tensor,
                                  replace_keeping_bias, shard_keys)

# A config without max_position_embeddings (a recurrent model) sets no context limit
NO_CONTEXT_LIMIT = 2**31 - 1

# Linear layers whose weight the model's forward reads itself instead of calling the layer, by
# model type (transformers 5.17): Mamba's mixer hands x_proj's, dt_proj's and out_proj's weights
# to its fused kernels and multiplies by dt_proj.weight in its torch path (Jamba's by dt_proj's);
# Mamba-2's and the hybrids' mixers hand out_proj's to theirs (their attention's is o_proj). A
# 4-bit weight there is read as packed bytes and an adapter is skipped (or, wrapped, has no
# weight to read), so these stay in the compute dtype, unadapted. PEFT refuses out_proj on most.
WEIGHT_READ_BY_MODEL = {
    **dict.fromkeys(("mamba", "falcon_mamba"), ("x_proj", "dt_proj", "out_proj")),
    "jamba": ("dt_proj",),
    **dict.fromkeys(("mamba2", "falcon_h1", "nemotron_h", "bamba", "granitemoehybrid", "zamba2"),
                    ("out_proj",)),
}


class LinearLayer(NamedTuple):
    """One linear layer of a generic model, as the checkpoint and transformers have it."""
    name: str  # module path: transformers' and PEFT's name
    in_features: int
    out_features: int
    bias: bool
    transposed: bool  # a Conv1D: its weight is stored [in, out]
    quantized: bool  # a plain nn.Linear or a Conv1D, so bitsandbytes' layer computes the same
    # the model's own forward reads this layer's weight, not its output (WEIGHT_READ_BY_MODEL):
    # kept in the compute dtype and never adapted
    weight_read_by_model: bool = False


@dataclass(frozen=True)
class GenericSpec:
    """What the loop, the planner and generation read of a generic model (ArchSpec's role)."""
    model_type: str
    architecture: str  # the transformers class, e.g. GPT2LMHeadModel
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    linears: tuple[LinearLayer, ...]  # every linear layer but the output head: PEFT's all-linear
    embedding_params: int  # embedding tables and the output head (once when tied)
    other_params: int  # everything else: norms, their biases, learned scales
    raw: dict = field(default_factory=dict, compare=False, repr=False)
    name: str = field(default="model", compare=False)
    sliding_window: int | None = None  # read by the CUDA-graph check, which never runs here

    def num_params(self) -> int:
        linear = sum(l.in_features * l.out_features + (l.out_features if l.bias else 0)
                     for l in self.linears)
        return linear + self.embedding_params + self.other_params


# --- from config.json to an empty transformers model ---------------------------------------------
def transformers_config(cfg: dict, source: str = "config.json"):
    """The transformers config object of a config.json dict; refuses what the generic path cannot
    build: remote code, unknown types, models that are not causal LMs, pre-quantized checkpoints."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = cfg.get("model_type")
    version = transformers.__version__
    if model_type not in CONFIG_MAPPING:
        if cfg.get("auto_map"):
            raise QloraError(
                f"{source}: model_type {model_type!r} exists only as code shipped with the "
                f"checkpoint (auto_map: {', '.join(sorted(cfg['auto_map']))}), and qlora never "
                f"runs remote code; it trains the causal LMs transformers {version} implements "
                "itself")
        raise QloraError(
            f"{source}: model_type {model_type!r} is not known to transformers {version}, so it "
            "cannot be built; a newer transformers may implement it")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise QloraError(f"{source}: transformers has no causal LM for model_type {model_type!r} "
                         "(an encoder, or a vision or speech model?); qlora trains causal LMs")
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        raise QloraError(f"{source}: a pre-quantized ({method}) {model_type} checkpoint; the "
                         "generic path quantizes 16-bit weights itself: give the 16-bit original")
    return CONFIG_MAPPING[model_type].from_dict({k: v for k, v in cfg.items() if k != "model_type"})


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter created inside goes to the meta device as it is registered; buffers stay
    real. Non-persistent buffers (rotary frequencies, embedding scales) are computed by the
    modules' constructors and are not in the checkpoint, so they must exist for real, while the
    parameters come from the checkpoint and need no memory until then."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_empty(config, dtype: torch.dtype):
    """The transformers model of `config`, parameters on the meta device, buffers on the CPU in
    `dtype` where their constructor uses the default dtype (as transformers builds them)."""
    from transformers import AutoModelForCausalLM

    with _parameters_on_meta():
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)


def linear_layers(hf) -> tuple[LinearLayer, ...]:
    """PEFT's all-linear: every nn.Linear and Conv1D but the output head. Those that are exactly
    nn.Linear or Conv1D are quantized, as transformers + bitsandbytes quantize them: not a
    subclass of nn.Linear (its forward may compute something else), nor a layer the model keeps
    in fp32 (a router, an indexer): those keep their 16-bit (or fp32) weight."""
    from transformers.pytorch_utils import Conv1D

    head = hf.get_output_embeddings()
    kept_wide = tuple(m.removesuffix(".weight") for m in (
        *(getattr(hf, "_keep_in_fp32_modules", None) or ()),
        *(getattr(hf, "_keep_in_fp32_modules_strict", None) or ())))
    read_by_model = WEIGHT_READ_BY_MODEL.get(getattr(hf.config, "model_type", None), ())
    layers = []
    for name, module in hf.named_modules():
        if module is head or not isinstance(module, (nn.Linear, Conv1D)):
            continue
        transposed = isinstance(module, Conv1D)
        n_in, n_out = (module.weight.shape if transposed
                       else (module.in_features, module.out_features))
        read = name.rsplit(".", 1)[-1] in read_by_model
        quantized = ((transposed or type(module) is nn.Linear) and not read
                     and not _matches(name, kept_wide))
        layers.append(LinearLayer(name, int(n_in), int(n_out), module.bias is not None,
                                  transposed, quantized, read))
    return tuple(layers)


def spec_of(hf, cfg: dict, name: str = "model") -> GenericSpec:
    """The facts of an (empty) transformers model the rest of qlora reads."""
    config = hf.config
    linears = linear_layers(hf)
    linear_modules = {layer.name for layer in linears}
    head = hf.get_output_embeddings()
    embedding_params = other_params = 0
    seen: set[int] = set()
    for module_name, module in hf.named_modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, nn.Embedding) or module is head:
                embedding_params += param.numel()
            elif module_name not in linear_modules:
                other_params += param.numel()
    embedding = hf.get_input_embeddings()
    hidden = getattr(config, "hidden_size", None) or embedding.embedding_dim
    tied = head is not None and head.weight is embedding.weight
    return GenericSpec(
        model_type=config.model_type,
        architecture=type(hf).__name__,
        vocab_size=int(embedding.num_embeddings),
        hidden_size=int(hidden),
        intermediate_size=int(getattr(config, "intermediate_size", None)
                              or getattr(config, "n_inner", None) or 4 * hidden),
        num_layers=int(getattr(config, "num_hidden_layers", None) or 1),
        max_position_embeddings=int(getattr(config, "max_position_embeddings", None)
                                    or NO_CONTEXT_LIMIT),
        tie_word_embeddings=bool(tied or getattr(config, "tie_word_embeddings", False)),
        linears=linears, embedding_params=embedding_params, other_params=other_params,
        raw=cfg, name=name,
    )


def spec_from_config(cfg: dict, source: str = "config.json", name: str = "model") -> GenericSpec:
    """A GenericSpec from config.json alone: the model is built empty, nothing is read."""
    config = transformers_config(cfg, source)
    return spec_of(build_empty(config, torch.bfloat16), cfg, name)


def read_generic_spec(model_dir: str | Path) -> GenericSpec:
    cfg, source = read_config(model_dir)
    return spec_from_config(cfg, source, name=Path(model_dir).name)


# --- a checkpoint's layout, for tools that read the files (merge) ---------------------------------
class CheckpointLayout(NamedTuple):
    """How a generic checkpoint's files relate to its model, for tools that work on the files
    (merge): the model name of each tensor, and which linear layers are stored transposed
    (Conv1D) or held in 4 bits by the generic path."""
    names: dict[str, str | None]  # tensor name in the files → in the model (None: unread)
    transposed: frozenset[str]  # module names
    quantized: frozenset[str]  # module names
    tied: frozenset[str]  # the embedding's and the head's module names where they share a weight


def checkpoint_layout(cfg: dict, keys, source: str = "config.json") -> CheckpointLayout:
    """The layout of a checkpoint of a generic model, from its config.json and tensor names."""
    hf = build_empty(transformers_config(cfg, source), torch.bfloat16)
    layers = linear_layers(hf)
    return CheckpointLayout(names=checkpoint_names(hf, keys, source),
                            transposed=frozenset(l.name for l in layers if l.transposed),
                            quantized=frozenset(l.name for l in layers if l.quantized),
                            tied=tied_modules(hf))


def tied_modules(hf) -> frozenset[str]:
    """The input embedding's and the output head's module names when the head is the embedding
    (one weight, as transformers ties them), else none."""
    head, embedding = hf.get_output_embeddings(), hf.get_input_embeddings()
    if head is None or head.weight is not embedding.weight:
        return frozenset()
    return frozenset(name for name, module in hf.named_modules(remove_duplicate=False)
                     if module is head or module is embedding)


# --- loading --------------------------------------------------------------------------------------
def load_generic(model_dir: str | Path, quant, device: str | torch.device = "cpu") -> "GenericLM":
    """Build the transformers model of `model_dir` and stream its weights in, each linear
    quantized as `quant` (a quant.QuantConfig) says as soon as it is read."""
    device = torch.device(device)
    cfg, source = read_config(model_dir)
    config = transformers_config(cfg, source)
    keys = shard_keys(model_dir)
    hf = build_empty(config, quant.compute_dtype)
    model = GenericLM(hf, spec_of(hf, cfg, name=Path(model_dir).name))
    model.name_or_path, model.quant = str(model_dir), quant
    _stream_weights(model, keys, quant, device, str(Path(model_dir)))
    model.notes += stacked_expert_notes(hf, quant) + weight_read_notes(model.spec)
    hf.tie_weights()
    _move_buffers(hf, device)
    check_nothing_missing(model, model_dir)
    model.eval()
    model.packs_documents = documents_kept_apart(model)
    return model


def weight_read_notes(spec: GenericSpec) -> list[str]:
    """What the log says of the linear layers the model reads the weight of itself."""
    leaves = sorted({layer.name.rsplit(".", 1)[-1] for layer in spec.linears
                     if layer.weight_read_by_model})
    if not leaves:
        return []
    return [f"{', '.join(leaves)}: this {spec.model_type} model reads their weights itself "
            "(not through the layer), so they stay in the compute dtype with no adapters"]


def stacked_expert_notes(hf, quant) -> list[str]:
    """What the log says about a mixture of experts' experts: each projection of a layer's
    experts is one 3D parameter ([experts, out, in]), not a linear layer, so it gets no adapter
    here, and stays in the compute dtype where the linear layers are 4-bit: bitsandbytes
    quantizes linear layers only (transformers + bitsandbytes keep the experts 16-bit too)."""
    stacked = sum(p.numel() for name, p in hf.named_parameters()
                  if p.dim() == 3 and name.rpartition(".")[0].endswith("experts"))
    if not stacked:
        return []
    kept = ""
    if quant.is_4bit:
        dtype = str(quant.compute_dtype).removeprefix("torch.")
        kept = (f" and stay in {dtype}, not {quant.method}, as transformers + bitsandbytes "
                "keep them (bitsandbytes quantizes linear layers only)")
    return [f"the experts' stacked 3D weights ({stacked / 1e6:,.1f}M parameters) get no "
            f"adapters{kept}; PEFT's all-linear adapts them and the router on some model types "
            "(OLMoE's among them), this path its linear layers only"]


def _stream_weights(model: "GenericLM", keys: dict[Path, list[str]], quant, device: torch.device,
                    source: str) -> None:
    """Every tensor of the checkpoint into its place, shard after shard: a linear's weight is
    quantized as soon as it is read, so its 16-bit copy is gone before the next is read; the
    rest goes in the compute dtype (fp32 where transformers keeps it so). Tensors transformers
    converts (a layer's experts) are held until the last of their parameter's is read, then
    converted and put in place: one layer's experts at a time, never the whole checkpoint. Every
    name is checked before any tensor is read."""
    plan = read_plan(model.hf, [k for shard in keys.values() for k in shard], source)
    converted_into = {stored: target for target, conversion in plan.conversions.items()
                      for stored in conversion.sources}
    gathered: dict[str, dict[str, torch.Tensor]] = {}  # parameter → its tensors read so far
    to_quantize = {layer.name: layer for layer in model.spec.linears if layer.quantized}
    fp32 = _fp32_modules(model.hf, quant.compute_dtype)
    for path, shard in keys.items():
        handle = open_shard(path)
        for key in shard:
            name = converted_into.get(key, plan.names[key])
            if name is None:
                continue
            module_name, _, leaf = name.rpartition(".")
            layer = to_quantize.get(module_name)
            if layer is not None and leaf == "weight":
                _set_quantized(model, layer, read_tensor(handle, path, key), quant, device)
                continue
            tensor = read_tensor(handle, path, key)
            if tensor.is_floating_point():
                tensor = tensor.to(torch.float32 if _matches(name, fp32) else quant.compute_dtype)
            if key not in converted_into:
                _set_tensor(model, name, tensor.to(device), path)
                continue
            parts = gathered.setdefault(name, {})
            parts[key] = tensor
            if len(parts) == len(plan.conversions[name].sources):
                del gathered[name]
                converted = convert_sources(model.hf, name, plan.conversions[name], parts, path)
                for target, value in converted.items():
                    _set_tensor(model, target, value.to(device), path)
        del handle


def _set_quantized(model, layer: LinearLayer, tensor: torch.Tensor, quant, device) -> None:
    """The layer becomes quantize_linear's layer of its [out, in] weight (a Conv1D's transposed)."""
    from qlora.quant import quantize_linear

    weight = tensor.t().contiguous() if layer.transposed else tensor
    expected = (layer.out_features, layer.in_features)
    if tuple(weight.shape) != expected:
        raise QloraError(f"tensor {layer.name}.weight has shape {tuple(tensor.shape)} but "
                         f"config.json implies {expected[::-1] if layer.transposed else expected}; "
                         "config.json and weights disagree")
    replace_keeping_bias(model, layer.name, quantize_linear(weight, None, quant, device))


def _set_tensor(model, name: str, tensor: torch.Tensor, path: Path) -> None:
    """A parameter (frozen) or a persistent buffer, in place of its meta placeholder."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, attr)
    if tuple(old.shape) != tuple(tensor.shape):
        raise QloraError(f"{path}: tensor {name} has shape {tuple(tensor.shape)} but config.json "
                         f"implies {tuple(old.shape)}; config.json and weights disagree")
    if attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        setattr(module, attr, nn.Parameter(tensor, requires_grad=False))


def _fp32_modules(hf, dtype: torch.dtype) -> tuple[str, ...]:
    """The modules transformers keeps in fp32 at this compute dtype: `_keep_in_fp32_modules` in
    fp16 only, `_keep_in_fp32_modules_strict` in fp16 and bf16."""
    names = []
    if dtype == torch.float16:
        names += list(getattr(hf, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        names += list(getattr(hf, "_keep_in_fp32_modules_strict", None) or ())
    return tuple(names)


def _matches(name: str, modules: tuple[str, ...]) -> bool:
    return any(re.search(rf"(^|\.){re.escape(m)}(\.|$)", name) for m in modules)


def _move_buffers(hf: nn.Module, device: torch.device) -> None:
    for module in hf.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[key] = buffer.to(device)


def documents_kept_apart(model: "GenericLM") -> bool:
    """Whether packed rows (documents one after the other, position_ids restarting at 0, no
    attention mask) keep their documents apart in this model, measured rather than assumed:
    transformers' mask builder separates them by the positions, but a model that does not pass
    position_ids there, or has recurrent layers, lets one document see the one before. The
    gradient of the second document's logits with respect to the first one's embeddings is then
    non-zero; kept apart, every path between them is masked out and it is exactly zero."""
    if not model.takes_positions:
        return False
    hf, device = model.hf, compute_device(model)
    ids = ((torch.arange(8, device=device) * 7 + 3) % model.spec.vocab_size)[None]
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]], device=device)
    kept = {}

    def keep_embeddings(module, args, output):
        kept["x"] = output.detach().requires_grad_(True)
        return kept["x"]

    hook = hf.get_input_embeddings().register_forward_hook(keep_embeddings)
    try:
        with torch.enable_grad():
            logits = hf(input_ids=ids, position_ids=positions, **model.no_cache).logits
            (grad,) = torch.autograd.grad(logits[:, 4:].float().sum(), kept["x"])
    except (RuntimeError, TypeError, ValueError) as err:
        model.notes.append(f"packing off: a packed forward failed ({type(err).__name__}: {err})")
        return False
    finally:
        hook.remove()
    return bool((grad[:, :4] == 0).all())


# --- the model ------------------------------------------------------------------------------------
class GenericCache:
    """transformers' own KV cache (or, for a model without one, the tokens so far)."""

    def __init__(self):
        self.past = None
        self.ids: torch.Tensor | None = None
        self.length = 0


class GenericLM(nn.Module):
    """A transformers causal LM behind DecoderLM's interface."""

    def __init__(self, hf, spec: GenericSpec):
        super().__init__()
        # The wrapper's children, parameters and buffers ARE the transformers model's (the same
        # dicts), so every module path is transformers' own ("transformer.h.0.attn.c_attn",
        # "lm_head"): the names of the checkpoint's tensors and of PEFT's adapter keys. A child
        # `self.hf` would prefix them all with "hf.". A layer replaced in place (quantized,
        # wrapped by an adapter) is replaced in both.
        for shared in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
            object.__setattr__(self, shared, getattr(hf, shared))
        object.__setattr__(self, "hf", hf)
        self.spec = spec
        forward_args = inspect.signature(hf.forward).parameters
        self.takes_positions = "position_ids" in forward_args
        self.no_cache = {"use_cache": False} if "use_cache" in forward_args else {}
        self.keeps_cache = "past_key_values" in forward_args
        self.packs_documents = False  # measured once the weights are in (documents_kept_apart)
        self.notes: list[str] = []  # what the log should say about this model's path
        # a mixture of experts' load-balancing loss, transformers' own function; added where
        # config.json's output_router_logits asks (or train's router_aux_loss), as MoeLM does
        self.router_loss = (router_loss_function(hf) if "output_router_logits" in forward_args
                            else None)
        asked = bool(getattr(hf.config, "output_router_logits", False))
        self.aux_loss = asked and self.router_loss is not None
        # the last forward's routing, where the router loss is on (added, or a per-token
        # forward's kept for a preference method)
        self.last_router_logits = None
        if asked and self.router_loss is None:
            self.notes.append("config.json asks for the router's load-balancing loss "
                              "(output_router_logits), which this path cannot add for "
                              f"{spec.architecture}; it trains without it")

    def train(self, mode: bool = True):
        super().train(mode)
        self.hf.training = mode  # the root is not a child of the wrapper
        return self

    @property
    def gradient_checkpointing(self) -> bool:
        return bool(getattr(self.hf, "is_gradient_checkpointing", False))

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        """transformers' own checkpointing of its layers; non-reentrant, as the reference's, so
        that a frozen base needs no input that requires grad."""
        if not on:
            if self.gradient_checkpointing:
                self.hf.gradient_checkpointing_disable()
            return
        if not self.hf.supports_gradient_checkpointing:
            raise QloraError(f"{self.spec.architecture} does not support gradient checkpointing "
                             "in transformers; set gradient_checkpointing: false")
        self.hf.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache: GenericCache | None = None,
                varlen=None, per_token: bool = False, real_lengths=None) -> torch.Tensor:
        """Logits [B, T, V] without labels; with labels, the SUM of token cross-entropies (fp32)
        over the shifted labels, or with `per_token` each one's, as DecoderLM returns them. A
        mixture of experts whose `aux_loss` is on adds to the sum router_aux_loss_coef · its
        load-balancing loss · the label tokens, as MoeLM (so the loop's mean is transformers'
        loss), counting each row's first `real_lengths` tokens (None: all of them)."""
        if varlen is not None:
            raise QloraError("the generic path has no varlen attention (the CUDA-graph step's)")
        if cache is not None:
            return self._next_logits(input_ids, cache)
        # with `per_token` (a preference method's log-probs) the routing is kept for the
        # method to add the loss itself (methods/preference.with_router_loss), as MoeLM's
        routed = labels is not None and self.adds_router_loss
        routing = {"output_router_logits": routed} if self.router_loss is not None else {}
        out = self.hf(input_ids=input_ids, **self._positions(input_ids, position_ids),
                      **self.no_cache, **routing)
        self.last_router_logits = out.router_logits if routed else None
        if labels is None:
            return out.logits
        if per_token:
            return token_losses(out.logits, labels)
        total = summed_loss(out.logits, labels)
        if not routed:
            return total
        n_labels = (shifted_targets(labels) != IGNORE_INDEX).sum()
        return total + self.router_loss_coef * n_labels * self.router_aux_loss(real_lengths)

    @property
    def router_loss_coef(self) -> float:
        return getattr(self.hf, "router_aux_loss_coef", 0)

    @property
    def adds_router_loss(self) -> bool:
        """Whether training adds the load-balancing loss (MoeLM's meaning)."""
        return bool(self.aux_loss) and self.router_loss_coef != 0

    def router_aux_loss(self, real_lengths: torch.Tensor | None = None,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
        """transformers' load-balancing loss of the last forward's routing, with the attention
        mask of the rows' real lengths where padding follows them (transformers' forward gets
        that mask from its caller; ours has none to pass: packed rows keep documents apart by
        position), or each token's weight given (`weights` [rows, T]: data/preference's
        router_weights, which the function weighs as a mask)."""
        logits, mask = self.last_router_logits, weights  # each layer's [rows · T, experts]
        if weights is None and real_lengths is not None:
            rows = real_lengths.shape[0]
            mask = real_token_weights(real_lengths, logits[0].shape[0], logits[0].device)
            mask = mask.view(rows, -1)
        return self.router_loss(logits, self.hf.num_experts, self.hf.num_experts_per_tok, mask)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """The final hidden states the output head reads (after the last norm)."""
        base = getattr(self.hf, self.hf.base_model_prefix)
        return base(input_ids=input_ids, **self._positions(input_ids, position_ids),
                    **self.no_cache).last_hidden_state

    def new_cache(self, batch: int, limit: int) -> GenericCache:
        """transformers makes the cache its model needs (sliding, hybrid...) on the first call."""
        return GenericCache()

    def _positions(self, input_ids, position_ids) -> dict:
        if position_ids is None or not self.takes_positions:
            return {}
        return {"position_ids": position_ids.to(input_ids.device, non_blocking=True)}

    def _next_logits(self, input_ids: torch.Tensor, cache: GenericCache) -> torch.Tensor:
        cache.length += input_ids.shape[1]
        if self.keeps_cache:
            out = self.hf(input_ids=input_ids, past_key_values=cache.past, use_cache=True)
            cache.past = out.past_key_values
            return out.logits
        # no cache this wrapper can pass: the whole sequence again, its new positions returned
        cache.ids = input_ids if cache.ids is None else torch.cat([cache.ids, input_ids], dim=1)
        return self.hf(input_ids=cache.ids, **self.no_cache).logits[:, -input_ids.shape[1]:]


def router_loss_function(hf):
    """transformers' own load-balancing loss for this model (the load_balancing_loss_func of its
    modeling module, which its forward adds where output_router_logits asks), or None where the
    module or the model's expert counts are not there to call it as that forward does."""
    function = getattr(sys.modules.get(type(hf).__module__), "load_balancing_loss_func", None)
    counts = ("num_experts", "num_experts_per_tok", "router_aux_loss_coef")
    return function if function is not None and all(hasattr(hf, c) for c in counts) else None


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropies (fp32) of the positions whose next label is not IGNORE_INDEX."""
    rows, targets = labelled_rows(logits, labels)
    return F.cross_entropy(rows.float(), targets, reduction="sum")


def token_losses(logits: torch.Tensor, labels) -> torch.Tensor:
    """Each of those cross-entropies (fp32 [N]), the positions in row-major order; or, where
    `labels` is a LabelPositions, at its positions in its order (its padding slot's target
    IGNORE_INDEX: a loss of 0)."""
    rows, targets = labelled_rows(logits, labels)
    return F.cross_entropy(rows.float(), targets, reduction="none", ignore_index=IGNORE_INDEX)
