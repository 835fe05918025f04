"""LoRA, rsLoRA and DoRA over a frozen (quantized) base linear, saved and loaded in PEFT's format.

A wrapped layer keeps PEFT's attribute names (`base_layer`, `lora_A`, `lora_B`,
`lora_magnitude_vector`) so that module paths, and therefore the adapter file's keys, are PEFT's.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from qlora.errors import QloraError
from qlora.files import staged_dir

from qlora.models.families.moe_blocks import ExpertLinear
from qlora.models.families.moe_config import EXPERT_PROJECTIONS
from qlora.models.generic import GenericLM
from qlora.models.spec import KNOWN_BLOCK_LINEARS  # every family's block linears
# a target name of an expert projection (PEFT's target_parameters end so: mlp.experts.down_proj)
EXPERT_TARGETS = tuple(f"experts.{name}" for name in EXPERT_PROJECTIONS)
PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class AdapterConfig:
    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    extra: dict = field(default_factory=dict)  # PEFT config keys we keep verbatim on save

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise QloraError(f"lora r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise QloraError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if self.dropout > 0:  # the seeded masks resolve p to 1/65536: refuse what they cannot draw
            from qlora.kernels.dropout import dropout_threshold

            dropout_threshold(self.dropout)
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


class LoraLinear(nn.Module):
    """y = base(x) + scale · B(A(dropout(x))), or DoRA's magnitude-rescaled version of it."""

    def __init__(self, base_layer: nn.Module, cfg: AdapterConfig):
        super().__init__()
        out_features, in_features = _linear_shape(base_layer)
        self.base_layer = base_layer
        self.lora_A = nn.Linear(in_features, cfg.r, bias=False)
        self.lora_B = nn.Linear(cfg.r, out_features, bias=False)
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scaling = cfg.scaling
        self.use_dora = cfg.use_dora
        self.dropout_p = cfg.dropout
        # set by seed_dropout(): masks drawn from (seed tensor + salt), not from the global RNG
        self.dropout_seed: torch.Tensor | None = None
        self.dropout_salt = 0
        # PEFT's default init: A like nn.Linear (kaiming uniform, a=√5), B zero, so ΔW starts at 0.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if cfg.use_dora:
            from qlora.quant import dequantize_weight

            with torch.no_grad():
                norm = torch.linalg.norm(dequantize_weight(base_layer).float(), dim=1)
            self.lora_magnitude_vector = nn.Parameter(norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast_base = getattr(self, "fast_base", None)  # set by qlora.speed.use_fast_path
        if getattr(self, "disabled", False):  # adapters_disabled(): the base layer alone
            return self.base_layer(x) if fast_base is None else fast_base(x, self.base_layer.bias)
        if fast_base is not None and not self.use_dora:
            return self._fast_forward(x, fast_base)
        result = self.base_layer(x) if fast_base is None else fast_base(x, self.base_layer.bias)
        A = self.lora_A.weight.to(x.dtype)
        B = self.lora_B.weight.to(x.dtype)
        if not self.use_dora:
            # result + scale·(xA)B as one GEMM that accumulates into the base output: no separate
            # full-size multiply and add (forward or backward), one rounding instead of three
            h = F.linear(self._dropout(x), A)
            if result.dtype != h.dtype:  # a base that answers in another dtype
                return result + F.linear(h, B) * self.scaling
            out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]),
                              B.t(), alpha=self.scaling)
            return out.view(result.shape)
        return result + self._dora_delta(x, result, A, B)

    def _fast_forward(self, x: torch.Tensor, fast_base: nn.Module) -> torch.Tensor:
        if self.training and self.dropout_p > 0 and self.dropout_seed is None:
            # dropout from the global RNG (not seed_dropout's masks): autograd's composition,
            # the LoRA product first and the base GEMM accumulating into it
            h = F.linear(self.lora_dropout(x), self.lora_A.weight.to(x.dtype))
            lora_out = F.linear(h, (self.lora_B.weight * self.scaling).to(x.dtype))
            return fast_base(x, self.base_layer.bias, addend=lora_out)
        return grouped_forward(x, [self], packed=True)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout_seed is None or not self.training:
            return self.lora_dropout(x)
        from qlora.kernels.dropout import seeded_dropout

        return seeded_dropout(x, self.dropout_seed, self.dropout_salt, self.dropout_p)

    def _dora_delta(self, x, result, A, B) -> torch.Tensor:
        # DoRA: W' = m · (W + sBA) / ‖W + sBA‖ (row norms, treated as a constant as the paper
        # advises), written as an addition to the base output so the base matmul is reused
        # whenever dropout leaves x unchanged.
        reuse_base = isinstance(self.lora_dropout, nn.Identity) or not self.training
        if reuse_base and not torch.is_grad_enabled():
            scale = self._inference_scale(A, B, x.dtype)
        else:
            weight = self._dense_base(x.dtype)
            with torch.no_grad():
                norm = torch.linalg.norm(weight + self.scaling * (B @ A), dim=1)
            scale = (self.lora_magnitude_vector.to(x.dtype) / norm).view(1, -1)
        if reuse_base:
            bias = self.base_layer.bias
            base = result if bias is None else result - bias
        else:
            x = self._dropout(x)
            base = F.linear(x, weight)
        return (scale - 1) * base + scale * F.linear(F.linear(x, A), B) * self.scaling

    def _dense_base(self, dtype: torch.dtype) -> torch.Tensor:
        from qlora.quant import dequantize_weight

        return dequantize_weight(self.base_layer).to(dtype)

    def _inference_scale(self, A, B, dtype) -> torch.Tensor:
        """m / ‖W + sBA‖ without gradients, kept until an adapter tensor changes: generation
        would otherwise dequantize every base weight for every token."""
        params = (self.lora_A.weight, self.lora_B.weight, self.lora_magnitude_vector)
        key = (dtype, *(p._version for p in params), *(p.data_ptr() for p in params))
        cached = getattr(self, "_scale_cache", None)
        if cached is None or cached[0] != key:
            norm = torch.linalg.norm(self._dense_base(dtype) + self.scaling * (B @ A), dim=1)
            cached = (key, (self.lora_magnitude_vector.to(dtype) / norm).view(1, -1))
            self._scale_cache = cached
        return cached[1]

    def delta_weight(self) -> torch.Tensor:
        """The merged weight minus the base weight, in fp32."""
        from qlora.quant import dequantize_weight

        weight = dequantize_weight(self.base_layer).float()
        lora = self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scaling
        if not self.use_dora:
            return lora
        merged = weight + lora
        scale = self.lora_magnitude_vector.float() / torch.linalg.norm(merged, dim=1)
        return merged * scale.unsqueeze(1) - weight


class ExpertFactor(nn.Module):
    """lora_B of an expert projection: `weight` [E, r, out], expert e's Bᵀ, the layout the
    grouped GEMM reads (speed/moe.py), so each pass casts it without a strided copy."""

    def __init__(self, experts: int, r: int, out_features: int):
        super().__init__()
        # zeros, as PEFT's B, after the draw PEFT's nn.Linear(r·E, out) makes for it: the RNG's
        # stream then moves as PEFT's does, and a seed gives the adapters it gave in that layout
        nn.init.kaiming_uniform_(torch.empty(out_features, experts * r), a=math.sqrt(5))
        self.weight = nn.Parameter(torch.zeros(experts, r, out_features))


class LoraExperts(nn.Module):
    """LoRA on one projection of every expert (an ExpertLinear): expert e's output is
    base_e(x) + scale · B_e A_e x. A is held as PEFT holds it for a 3D parameter
    (`target_parameters`): lora_A [r·E, in], expert e's A its rows e·r … e·r + r − 1. B is held
    transposed per expert (ExpertFactor, [E, r, out]); PEFT's lora_B [out, r·E], expert e's B
    the columns e, e + E, e + 2E, … (its reshape(out, r, E)), is what `peft_b` gives and
    `load_peft_b` takes: adapter files have PEFT's layout. No dropout and no DoRA: PEFT's LoRA
    on a parameter has neither."""

    def __init__(self, base_layer: ExpertLinear, cfg: AdapterConfig):
        super().__init__()
        if cfg.use_dora:
            raise QloraError("DoRA cannot adapt expert projections (PEFT's LoRA on expert "
                             "parameters has no DoRA); leave experts.gate_up_proj and "
                             "experts.down_proj out of target_modules, or use LoRA")
        self.base_layer = base_layer
        self.num_experts, self.r = base_layer.num_experts, cfg.r
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.Linear(self.in_features, cfg.r * self.num_experts, bias=False)
        self.lora_B = ExpertFactor(self.num_experts, cfg.r, self.out_features)  # zeros: PEFT's
        self.scaling = cfg.scaling
        self.disabled = False  # adapters_disabled()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init, as LoraLinear

    @property
    def members(self) -> int:
        return self.base_layer.members

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [E, r, in], B [E, out, r]) in `dtype`: every expert's factors, views of the
        parameters (cast where `dtype` is not theirs)."""
        a = self.lora_A.weight.to(dtype).view(self.num_experts, self.r, self.in_features)
        return a, self.lora_B.weight.to(dtype).transpose(1, 2)

    def peft_b(self) -> torch.Tensor:
        """lora_B in PEFT's layout, [out, r·E] (a copy where r and E exceed 1, else a view)."""
        return self.lora_B.weight.permute(2, 1, 0).reshape(self.out_features, -1)

    def load_peft_b(self, b: torch.Tensor) -> None:
        """lora_B from PEFT's layout [out, r·E]."""
        out, r, e = self.out_features, self.r, self.num_experts
        self.lora_B.weight.copy_(b.reshape(out, r, e).permute(2, 1, 0))

    def expert_weight(self, expert: int, dtype: torch.dtype) -> torch.Tensor:
        return self.base_layer.expert_weight(expert, dtype)

    def dense_weights(self, dtype: torch.dtype) -> torch.Tensor:
        return self.base_layer.dense_weights(dtype)

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        base = self.base_layer(x, expert)
        if self.disabled:
            return base
        a, b = self.factors(x.dtype)
        return base + F.linear(F.linear(x, a[expert]), b[expert]) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """Every expert's merged weight minus its base weight [E, out, in], in fp32."""
        a, b = self.factors(torch.float32)
        return torch.bmm(b, a) * self.scaling


def groupable(layers) -> bool:
    """Whether `layers` can share one base GEMM (grouped_forward): each a non-DoRA LoraLinear on
    the 4-bit fast path (speed.use_fast_path), all reading inputs of one width."""
    fast = [isinstance(layer, LoraLinear) and not layer.use_dora
            and getattr(layer, "fast_base", None) is not None for layer in layers]
    return (all(fast) and len({layer.lora_A.in_features for layer in layers}) == 1
            and len({(layer.dropout_p, id(layer.dropout_seed)) for layer in layers}) == 1
            and len({layer.lora_A.out_features for layer in layers}) == 1)


def grouped_forward(x: torch.Tensor, layers, packed: bool = False, base: bool = True
                    ) -> tuple[torch.Tensor, ...] | torch.Tensor:
    """[layer(x) for layer in layers] with one base GEMM over the layers' stacked 4-bit weights,
    for layers that pass `groupable` and draw their dropout masks from seed_dropout's seed (or
    have none): kernels/lora.py's LoraProducts, then its Matmul4bit. A single layer is the group
    of one.

    Each layer keeps its own dropout mask, A, B, scaling and bias. Returns views of one
    [.., Σ out] tensor, split along its last dim; the split's backward joins their gradients into
    the one tensor the backward multiplies. packed=True returns that one tensor instead (the
    layers' outputs side by side, in order), for a consumer that reads the columns in place and
    returns its gradient whole (kernels/fused.swiglu_packed). base=False leaves out the base GEMM and
    the biases: the LoRA products alone, for a checkpoint's rerun whose consumer does not read the
    values (speed/kept_attention.AttentionKeptForRerun) but whose backward needs what they save.
    """
    from qlora.kernels.lora import LoraGroup, lora_4bit

    dropout = layers[0].training and layers[0].dropout_p > 0
    if dropout and layers[0].dropout_seed is None:  # global-RNG dropout: layer by layer
        outs = [layer._fast_forward(x, layer.fast_base) for layer in layers]
        return torch.cat(outs, dim=-1) if packed else tuple(outs)
    group = LoraGroup(
        scales=tuple(layer.scaling for layer in layers),
        salts=tuple(layer.dropout_salt for layer in layers),
        out_features=tuple(layer.lora_B.out_features for layer in layers),
        p=layers[0].dropout_p if dropout else 0.0,
        metas=tuple(layer.fast_base.meta for layer in layers),
        tensors=tuple(t for layer in layers for t in layer.fast_base.tensors()))
    adapters = [layer.lora_A.weight for layer in layers] + [layer.lora_B.weight for layer in layers]
    out = lora_4bit(x, layers[0].dropout_seed if dropout else None, group, adapters, base)
    biases = [layer.base_layer.bias for layer in layers]
    if base and any(b is not None for b in biases):
        out = out + torch.cat([
            b.to(out.dtype) if b is not None
            else torch.zeros(layer.lora_B.out_features, dtype=out.dtype, device=out.device)
            for b, layer in zip(biases, layers)])
    if packed:
        return out
    return out.split([layer.lora_B.out_features for layer in layers], dim=-1)


def _linear_shape(layer: nn.Module) -> tuple[int, int]:
    return layer.out_features, layer.in_features


def seed_dropout(model: nn.Module, seed: torch.Tensor) -> int:
    """Draw every LoRA dropout mask from `seed` (a one-element int64 tensor on the model's device)
    instead of the global RNG; returns the number of adapter layers, the stride by which to
    advance the seed between micro-batches so that no two (micro-batch, layer) share a mask.

    Then no layer uses the global RNG, so checkpointed layers need no saved RNG state and the
    step can be captured as a CUDA graph (train/graphs.py); `set_dropout_seed` sets the seed.
    """
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    for salt, layer in enumerate(layers):
        layer.dropout_seed, layer.dropout_salt = seed, salt
    return len(layers)


def set_dropout_seed(seed: torch.Tensor, run_seed: int, micro_batch_index: int, stride: int) -> None:
    """The seed of a micro-batch, a function of the run's seed and the micro-batch's place in the
    data order: a resumed run draws the same masks as an uninterrupted one."""
    seed.fill_(((run_seed % 2**20) << 40) + micro_batch_index * stride)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model, adapters off, inside the block: the reference model of DPO and KTO without
    a second copy of the weights (TRL's `disable_adapter` for PEFT models).

    Each LoraLinear answers with its base layer alone. Its scaling is also set to 0 for the
    grouped fast path (grouped_forward reads the layers' weights and scales, not forward()), so
    there too the LoRA term adds exactly zero; DoRA layers never take that path."""
    layers = [m for m in model.modules() if isinstance(m, (LoraLinear, LoraExperts))]
    kept = [layer.scaling for layer in layers]
    for layer in layers:
        layer.disabled, layer.scaling = True, 0.0
    try:
        yield model
    finally:
        for layer, scaling in zip(layers, kept):
            layer.disabled, layer.scaling = False, scaling


def target_names(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Full module paths to wrap. `all-linear` is every linear of the decoder blocks (not lm_head);
    on the generic path, PEFT's meaning: every linear layer but the output head."""
    if isinstance(model, GenericLM):
        return _generic_target_names(model, target_modules)
    experts = _expert_linears(model)
    linears = model.spec.block_linears()  # the family's (phi3's fused ones)
    expert_names = EXPERT_TARGETS if experts else ()
    if model.spec.moe is not None:
        # PEFT (0.21, on transformers 5) reads gate_proj/up_proj/down_proj in a mixture of
        # experts' adapter as the experts' (transformers 4's per-expert names), never as a
        # dense layer's: an adapter on Qwen3-MoE's dense MLP layers would not load there
        dense = [t for t in (target_modules if target_modules != "all-linear" else ())
                 if t in ("gate_proj", "up_proj", "down_proj")]
        if dense:
            raise QloraError(
                f"target_modules {dense}: a mixture of experts' dense MLP layers take no "
                "adapters (PEFT reads these names as the experts' and would not load them); "
                "target the experts as experts.gate_up_proj, experts.down_proj")
        linears = tuple(n for n in linears if n not in ("gate_proj", "up_proj", "down_proj"))
    if target_modules == "all-linear":  # a mixture of experts: its experts' projections too
        wanted = set(linears) | set(expert_names)
    else:
        wanted = {_expert_target(t) for t in target_modules}
    present = {name.rsplit(".", 1)[-1] for name, _ in _block_linears(model)} | set(expert_names)
    missing = sorted(wanted - present)
    if missing:
        raise QloraError(
            f"target_modules {missing} do not exist in this model; its linear layers are "
            f"{sorted(present)} (or use all-linear)"
        )
    names = [name for name, _ in _block_linears(model) if name.rsplit(".", 1)[-1] in wanted]
    return names + [name for name in experts if _expert_target(name) in wanted]


def _expert_target(name: str) -> str:
    """`experts.down_proj` for any name ending so (PEFT's `mlp.experts.down_proj`, a module
    path); any other name unchanged."""
    for target in EXPERT_TARGETS:
        if name == target or name.endswith("." + target):
            return target
    return name


def _expert_linears(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules()
            if isinstance(module, ExpertLinear)]


def _block_linears(model: nn.Module):
    for name, module in model.named_modules():
        # an expert projection shares its leaf name with a dense MLP's (down_proj)
        if ".layers." in name and name.rsplit(".", 1)[-1] in KNOWN_BLOCK_LINEARS and not isinstance(
            module, (LoraLinear, LoraExperts, ExpertLinear)
        ):
            yield name, module


def _generic_target_names(model: GenericLM, target_modules: str | list[str]) -> list[str]:
    """A name in target_modules matches a layer whose path is it or ends in "." + it, as PEFT
    matches (`c_attn`, `mlp.c_proj`, `model.layers.0.self_attn.q_proj`)."""
    def matches(name: str, target: str) -> bool:
        return name == target or name.endswith("." + target)

    read = [layer.name for layer in model.spec.linears if layer.weight_read_by_model]
    linears = [layer.name for layer in model.spec.linears if layer.name not in read
               and not isinstance(model.get_submodule(layer.name), LoraLinear)]
    if target_modules == "all-linear":
        return linears
    refused = sorted({t for t in target_modules if any(matches(n, t) for n in read)})
    if refused:
        raise QloraError(f"target_modules {refused}: this {model.spec.model_type} model reads "
                         "their weights itself, not through the layer, so an adapter there would "
                         "be skipped; leave them out (all-linear does)")

    missing = [t for t in target_modules if not any(matches(n, t) for n in linears)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise QloraError(f"target_modules {missing} match no linear layer of this "
                         f"{model.spec.model_type} model; its linear layers are {leaves} "
                         "(or use all-linear)")
    return [n for n in linears if any(matches(n, t) for t in target_modules)]


def attach_adapters(model: nn.Module, cfg: AdapterConfig, within: str = "") -> list[str]:
    """Freeze the model and wrap each target linear in a LoraLinear. Returns the wrapped paths.
    `within`: only the targets whose path starts so (one layer of a streamed model)."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n in target_names(model, cfg.target_modules) if n.startswith(within)]
    for name in names:
        parent_name, leaf = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, leaf)
        wrapper = LoraExperts if isinstance(layer, ExpertLinear) else LoraLinear
        device = _device_of(layer)
        if device.type == "meta":  # a layer not read (load_model's `only`): nothing allocated
            with torch.device("meta"):
                setattr(parent, leaf, wrapper(layer, cfg))
        else:
            setattr(parent, leaf, wrapper(layer, cfg).to(device))
    model.adapter_config = cfg
    model.adapter_targets = sorted({_target_name(n) for n in names})
    return names


def _device_of(layer: nn.Module) -> torch.device:
    """Where a wrapped layer's weight is (its wrapper goes there too)."""
    return next(iter([*layer.parameters(), *layer.buffers()])).device


def _target_name(path: str) -> str:
    """A wrapped layer's name in target_modules: its leaf, `experts.<projection>` for experts."""
    expert = _expert_target(path)
    return expert if expert in EXPERT_TARGETS else path.rsplit(".", 1)[-1]


class AdapterTensor(NamedTuple):
    """One adapter tensor as PEFT's file holds it: its shape there, `read` giving it in PEFT's
    layout (a copy for an expert projection's lora_B: LoraExperts.peft_b), `write` copying such
    a tensor into the model (to the parameter's device and dtype; nothing on the meta device)."""
    shape: torch.Size
    read: Callable[[], torch.Tensor]
    write: Callable[[torch.Tensor], None]


def adapter_tensors(model: nn.Module) -> dict[str, AdapterTensor]:
    """The attached adapters' tensors under PEFT's key names."""
    entries = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraExperts):
            prefix = PEFT_PREFIX + peft_expert_path(model, name)
            entries[f"{prefix}.lora_A.weight"] = _parameter_entry(module.lora_A.weight)
            b = module.lora_B.weight
            entries[f"{prefix}.lora_B.weight"] = AdapterTensor(
                torch.Size((module.out_features, b.shape[0] * b.shape[1])), module.peft_b,
                _writer(b, module.load_peft_b))
        if isinstance(module, LoraLinear):
            entries[f"{PEFT_PREFIX}{name}.lora_A.weight"] = _parameter_entry(module.lora_A.weight)
            entries[f"{PEFT_PREFIX}{name}.lora_B.weight"] = _parameter_entry(module.lora_B.weight)
            if module.use_dora:
                entries[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = _parameter_entry(
                    module.lora_magnitude_vector)
    return entries


def _parameter_entry(param: torch.Tensor) -> AdapterTensor:
    return AdapterTensor(param.shape, lambda: param, _writer(param, param.copy_))


def _writer(param: torch.Tensor, copy_in: Callable[[torch.Tensor], None]):
    def write(tensor: torch.Tensor) -> None:
        if not param.is_meta:
            with torch.no_grad():
                copy_in(tensor.to(param.device, param.dtype))
    return write


def copy_into_adapters(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """PEFT-named, PEFT-laid-out tensors (read from an adapter file) into the model's attached
    adapters, each in its own layout and dtype: every adapter tensor the model has, no other."""
    entries = adapter_tensors(model)
    if set(state) != set(entries):
        raise QloraError(f"the saved adapter's tensors are not this model's: missing "
                         f"{sorted(set(entries) - set(state))[:2]}, unexpected "
                         f"{sorted(set(state) - set(entries))[:2]}")
    for key, tensor in state.items():
        entries[key].write(tensor)


def peft_expert_path(model: nn.Module, path: str) -> str:
    """PEFT's module path of the adapter on the expert projection at `path`
    (`...mlp.experts.gate_up_proj`). PEFT wraps each targeted parameter of `experts` in a
    wrapper of its own, nested in parameter order (gate_up_proj inside, down_proj outside), so
    the outer one's tensors sit at `experts.lora_A` and each one inside it one `base_layer.`
    deeper."""
    experts, projection = path.rsplit(".", 1)
    later = EXPERT_PROJECTIONS[EXPERT_PROJECTIONS.index(projection) + 1:]
    depth = sum(isinstance(getattr(model.get_submodule(experts), p), LoraExperts) for p in later)
    return experts + ".base_layer" * depth


def peft_config_dict(cfg: AdapterConfig, targets: list[str], base_model: str,
                     fan_in_fan_out: bool = False) -> dict:
    # expert projections are PEFT's target_parameters (3D parameters in transformers), whose
    # LoRA has no dropout: PEFT refuses to load one that says otherwise. Dropout acts only in
    # training, so the adapter's outputs are the same.
    modules = [t for t in targets if t not in EXPERT_TARGETS]
    parameters = [f"mlp.{t}" for t in targets if t in EXPERT_TARGETS]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": 0.0 if parameters else cfg.dropout,
        "target_modules": modules,
        "bias": "none",
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    if parameters:
        config["target_parameters"] = parameters
    config.update(cfg.extra)
    return config


def save_adapter(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (PEFT's format), atomically."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    # one tensor at a time to the host: an expert projection's lora_B is a copy on the GPU
    with torch.no_grad():
        state = {key: entry.read().to("cpu").contiguous()
                 for key, entry in adapter_tensors(model).items()}
    if not state:
        raise QloraError("the model has no adapters to save (attach_adapters was not called)")
    config = peft_config_dict(model.adapter_config, model.adapter_targets, base_model_name_or_path,
                              fan_in_fan_out=_wraps_conv1d(model))
    with staged_dir(out, replace=True) as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def _wraps_conv1d(model: nn.Module) -> bool:
    """Whether an adapter sits on a layer stored as a Conv1D ([in, out]) in the checkpoint: PEFT
    then writes fan_in_fan_out true, which tells a merge to fold it in transposed."""
    if not isinstance(model, GenericLM):
        return False
    return any(layer.transposed and isinstance(model.get_submodule(layer.name), LoraLinear)
               for layer in model.spec.linears)


def read_adapter_json(adapter_dir: str | Path) -> dict:
    """adapter_config.json of a LoRA adapter directory, as saved: the one reader of it (loading
    and merge alike), naming what is missing or broken."""
    root = Path(adapter_dir)
    if not root.is_dir():
        raise QloraError(f"adapter directory {root} does not exist (--adapter takes a directory "
                         f"in PEFT format: {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    path = root / ADAPTER_CONFIG
    if not path.is_file():
        raise QloraError(f"{root} is not an adapter directory: it has no {ADAPTER_CONFIG} (--adapter "
                         f"takes a training run's output_dir or another PEFT adapter directory)")
    try:
        raw = json.loads(path.read_text())
    except ValueError as err:
        raise QloraError(f"{path}: not valid JSON ({err}); save the adapter again") from None
    if not isinstance(raw, dict):
        raise QloraError(f"{path}: not a JSON object; save the adapter again")
    if raw.get("peft_type", "LORA") != "LORA":
        raise QloraError(f"{path}: peft_type {raw.get('peft_type')!r} is not supported (only LORA)")
    return raw


def adapter_weights_file(adapter_dir: str | Path) -> Path:
    """The adapter directory's adapter_model.safetensors, which must exist."""
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights.is_file():
        bin_hint = (" (found adapter_model.bin: re-save it with safetensors)"
                    if (Path(adapter_dir) / "adapter_model.bin").exists() else "")
        raise QloraError(f"{weights} not found: the adapter directory has no {ADAPTER_WEIGHTS}"
                         f"{bin_hint}")
    return weights


def read_adapter_weights(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of the adapter directory's adapter_model.safetensors, under PEFT's names: the
    one reader of it (loading and merge alike), naming a missing or damaged file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = adapter_weights_file(adapter_dir)
    try:
        return load_file(str(weights))
    except SafetensorError as err:  # a truncated copy, or another file under the name
        raise QloraError(f"{weights} is damaged or not a safetensors file ({err}); save the "
                         f"adapter again, or copy it again from where it came") from err


def _name_stem(name: str) -> str:
    """'org/Llama-3-8B-bnb-4bit' / '/models/llama-3-8b/' → 'llama-3-8b' (for comparing base names)."""
    stem = name.rstrip("/\\").replace("\\", "/").split("/")[-1].lower()
    for tail in ("-bnb-4bit", "-4bit", "-bnb", "-unsloth", "-hf"):
        stem = stem.removesuffix(tail)
    return stem


def check_base_name(adapter_cfg: dict, model_dir: Path, config: dict) -> None:
    """Refuse an adapter whose base_model_name_or_path names another model than model_dir.

    'Names another model' means: the adapter records a base name, and its last path component
    matches neither the model directory's name nor the `_name_or_path` in its config.json
    (case-insensitive, quantization suffixes like -bnb-4bit ignored). Shapes are checked too,
    but two models of one architecture and size (base vs instruct) have the same shapes.
    """
    recorded = adapter_cfg.get("base_model_name_or_path")
    if not recorded:
        return
    ours = {_name_stem(str(model_dir.resolve())), _name_stem(str(model_dir))}
    if config.get("_name_or_path"):
        ours.add(_name_stem(config["_name_or_path"]))
    if _name_stem(recorded) not in ours:
        raise QloraError(
            f"the adapter was trained on {recorded!r} (adapter_config.json base_model_name_or_path) "
            f"but the base given is {str(model_dir)!r}; pass the matching base, or "
            f"--ignore-base-name if this is the same model under another name")


def check_adapter_base(model_dir: str | Path, adapter_dir: str | Path | None,
                       ignore_base_name: bool = False) -> None:
    """The one base-name check of generate, chat, eval, merge and export: refuse (QloraError) an
    adapter whose adapter_config.json names another base than model_dir, unless told to ignore
    it (--ignore-base-name). Missing or unreadable files pass here: the loaders name them."""
    if adapter_dir is None or ignore_base_name:
        return
    try:
        adapter_cfg = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return
    if isinstance(adapter_cfg, dict) and isinstance(config, dict):
        check_base_name(adapter_cfg, Path(model_dir), config)


def read_adapter_config(adapter_dir: str | Path) -> AdapterConfig:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    raw = read_adapter_json(adapter_dir)
    if any(t == "gate.weight" or t.endswith(".gate.weight")
           for t in raw.get("target_parameters") or ()):
        raise QloraError(
            f"{path}: this adapter adapts the router (target_parameters gate.weight: PEFT's "
            "all-linear on a mixture of experts does, and gives gate_up_proj twice the rank), "
            "where qlora keeps the router frozen and one rank; `qlora merge` folds it into the "
            "base, and generate, chat, eval and export then read the merged model. To train "
            "with it, retrain with target_modules naming the projections (as qlora train saves)")
    for key in ("rank_pattern", "alpha_pattern"):
        if raw.get(key):
            raise QloraError(f"{path}: per-layer {key} is not supported yet; retrain with one "
                             "r/alpha, or fold it into the base with `qlora merge`")
    if raw.get("bias", "none") != "none":
        raise QloraError(f"{path}: bias={raw['bias']!r} is not supported (only 'none')")
    targets = raw.get("target_modules")
    experts = [_expert_target(t) for t in raw.get("target_parameters") or ()]
    unknown = [t for t in experts if t not in EXPERT_TARGETS]
    if unknown:
        raise QloraError(f"{path}: target_parameters {unknown} are not expert projections; "
                         f"supported: {', '.join('mlp.' + t for t in EXPERT_TARGETS)}")
    if experts and not targets:  # the experts alone
        targets = []
    elif not targets:
        targets = "all-linear"
    if isinstance(targets, list):
        # PEFT may save full module paths (model.layers.0.mlp.up_proj): the leaf names say which
        # linears; an adapter on only some layers then lacks tensors, which load_adapter names
        targets = sorted({t if t in EXPERT_TARGETS else t.rsplit(".", 1)[-1] for t in targets})
    if isinstance(targets, str) and targets != "all-linear":
        # PEFT stores a regex when target_modules was given as one; match leaf names in it
        targets = [m for m in KNOWN_BLOCK_LINEARS if re.search(targets, f"model.layers.0.self_attn.{m}")
                   or re.search(targets, f"model.layers.0.mlp.{m}")]
    if experts and targets != "all-linear":  # PEFT's target_parameters: the experts' projections
        targets = sorted(set(targets) | set(experts))
    return AdapterConfig(
        r=raw["r"], alpha=raw.get("lora_alpha", 8), dropout=raw.get("lora_dropout", 0.0),
        target_modules=targets, use_rslora=raw.get("use_rslora", False),
        use_dora=raw.get("use_dora", False),
    )


def read_saved_adapter(adapter_dir: str | Path) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """(config, tensors under PEFT's names) of the adapter saved in `adapter_dir`."""
    cfg = read_adapter_config(adapter_dir)
    return cfg, read_adapter_weights(adapter_dir)


def load_adapter(model: nn.Module, adapter_dir: str | Path,
                 saved: tuple[AdapterConfig, dict[str, torch.Tensor]] | None = None,
                 within: str = "") -> AdapterConfig:
    """Attach the adapter saved in `adapter_dir` (ours or PEFT's) to `model`. For a streamed
    model (export/reference.py), layer after layer: `saved`, what read_saved_adapter returned
    (read once); `within`, the layer's path (attach_adapters), its tensors alone checked and
    copied; layers on the meta device are checked, nothing copied."""
    cfg, state = saved or read_saved_adapter(adapter_dir)
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    refuse_per_expert(state, weights)
    attach_adapters(model, cfg, within)
    expected = adapter_tensors(model)
    if within:
        state = {k: v for k, v in state.items() if k.startswith(PEFT_PREFIX + within)}
        expected = {k: v for k, v in expected.items() if k.startswith(PEFT_PREFIX + within)}
    unknown = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unknown or missing:
        raise QloraError(
            f"{weights} does not fit this model: {len(missing)} adapter tensors missing "
            f"(e.g. {missing[:2]}), {len(unknown)} unexpected (e.g. {unknown[:2]}); "
            "was it trained on another base model?"
        )
    for key, tensor in state.items():
        if expected[key].shape != tensor.shape:
            raise QloraError(
                f"{weights}: {key} has shape {tuple(tensor.shape)} but this model needs "
                f"{tuple(expected[key].shape)}; the adapter was trained on another base model"
            )
    for key, tensor in state.items():
        expected[key].write(tensor)
    return cfg


PER_EXPERT_LORA = re.compile(r"\.experts\.\d+\.[^.]+\.lora_[AB]\.")


def refuse_per_expert(state: dict[str, torch.Tensor], weights: Path) -> None:
    """An adapter of transformers 4's per-expert linears (experts.N.w1, experts.N.gate_proj: the
    Hub's older Mixtral and Qwen3-MoE adapters) does not fit the stacked experts this model holds
    (transformers 5's, whose adapters PEFT saves as target_parameters); merge reads it."""
    old = next((k for k in state if PER_EXPERT_LORA.search(k)), None)
    if old is not None:
        raise QloraError(
            f"{weights}: {old} is a per-expert LoRA tensor (transformers 4's layout of a "
            "mixture of experts), and this model holds each projection's experts stacked, as "
            "transformers 5 does; `qlora merge` folds this adapter into the base (it reads the "
            "per-expert names), then generate, chat or train from the merged model")


def trainable_summary(model: nn.Module) -> str:
    """PEFT's print_trainable_parameters line (the 4-bit base counted as PEFT counts it)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    for p in model.parameters():
        n = p.numel()
        # a packed 4-bit tensor holds two weights per byte; PEFT counts the weights
        if p.dtype == torch.uint8 and hasattr(p, "quant_state"):
            n *= 2
        total += n
    from qlora.quant import QuantizedStack

    # 4-bit experts are buffers of their stacks, not parameters: counted by their weights
    total += sum(m.count * m.shape[0] * m.shape[1] for m in model.modules()
                 if isinstance(m, QuantizedStack))
    return (f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / total:.4f}")
