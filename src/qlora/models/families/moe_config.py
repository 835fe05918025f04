"""What a mixture-of-experts config.json means (Mixtral, Qwen3-MoE), for their family modules,
their blocks (moe_blocks.py), the memory planner and the loader alike.

A sparse block routes each token to `top_k` of `num_experts` SwiGLU experts: the router's logits
(a linear without bias), their softmax in fp32, the top_k largest, renormalised to sum to 1 where
the family says so (Mixtral always, Qwen3-MoE when `norm_topk_prob`), weight the experts' outputs.
Training may add transformers' load-balancing loss (`router_aux_loss_coef` times it, when
config.json's `output_router_logits` is true, as transformers adds it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# the expert projections, by transformers' parameter names: gate and up stacked [E, 2I, H] (gate
# rows first), down [E, H, I]; PEFT targets them with `target_parameters` under these names
EXPERT_PROJECTIONS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class MoeSpec:
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    sparse_layers: tuple[bool, ...]  # per layer: a sparse block (True) or a dense MLP (False)
    renormalize: bool  # the top_k probabilities divided by their sum
    aux_loss_coef: float  # router_aux_loss_coef
    aux_loss: bool  # output_router_logits: transformers adds coef · aux to the training loss
    jitter_noise: float = 0.0  # Mixtral's router_jitter_noise (training only)
    # the router's weights cast to the hidden dtype before they scale the experts' outputs
    # (Qwen3-MoE), or kept fp32 until the product is rounded (Mixtral)
    weights_in_hidden_dtype: bool = False

    @property
    def num_sparse_layers(self) -> int:
        return sum(self.sparse_layers)


def num_experts(cfg: dict, default: int) -> int:
    """transformers 5 writes `num_local_experts`, older files of either family may say
    `num_experts` (its attribute_map makes them one)."""
    return int(cfg.get("num_local_experts", cfg.get("num_experts", default)))


def sparse_layer_flags(num_layers: int, step: int = 1, dense_layers=()) -> tuple[bool, ...]:
    """Qwen3-MoE's rule (transformers' Qwen3MoeDecoderLayer): layer i is sparse unless listed in
    mlp_only_layers, and only every `decoder_sparse_step`-th layer ((i + 1) % step == 0)."""
    dense = set(dense_layers or ())
    return tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))


def expert_shapes(moe: MoeSpec, hidden_size: int) -> dict[str, tuple[int, int, int]]:
    """(experts, out, in) of each expert projection of a sparse block."""
    e, i = moe.num_experts, moe.expert_intermediate_size
    return {"gate_up_proj": (e, 2 * i, hidden_size), "down_proj": (e, hidden_size, i)}


# How checkpoints name the experts. On the Hub, one linear per expert: Mixtral's
# `block_sparse_moe.experts.N.w1` (gate), `w3` (up), `w2` (down); Qwen3-MoE's
# `mlp.experts.N.gate_proj`, `up_proj`, `down_proj`. transformers 5 saves them so too; a
# checkpoint written without that conversion holds its stacks (`mlp.experts.gate_up_proj`).
HUB_EXPERT = re.compile(r"^(model\.layers\.\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
                        r"(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
STACKED_EXPERTS = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
# a per-expert linear → (the projection it is part of, its place in it: gate rows, then up)
EXPERT_LINEARS = {"w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", 0),
                  "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
                  "down_proj": ("down_proj", 0)}
# the per-expert linear names a checkpoint of each family uses, by projection and place
HUB_LINEAR_NAMES = {"mixtral": {("gate_up_proj", 0): "w1", ("gate_up_proj", 1): "w3",
                                ("down_proj", 0): "w2"},
                    "qwen3_moe": {("gate_up_proj", 0): "gate_proj", ("gate_up_proj", 1): "up_proj",
                                  ("down_proj", 0): "down_proj"}}
HUB_BLOCK_NAMES = {"mixtral": "block_sparse_moe", "qwen3_moe": "mlp"}


def module_key(key: str) -> str:
    """A checkpoint key under transformers' (and our) module names: Mixtral's block is `mlp`."""
    return key.replace(".block_sparse_moe.", ".mlp.")


def hub_expert_key(model_type: str, layer: str, projection: str, expert: int, part: int) -> str:
    """The Hub checkpoint key of one expert's linear (`layer`: "model.layers.N")."""
    block = HUB_BLOCK_NAMES[model_type]
    name = HUB_LINEAR_NAMES[model_type][(projection, part)]
    return f"{layer}.{block}.experts.{expert}.{name}.weight"
