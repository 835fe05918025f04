"""Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B): Qwen3's attention (q/k norms) and, in the layers that
`decoder_sparse_step` and `mlp_only_layers` leave sparse, a mixture-of-experts block of
`num_experts` SwiGLU experts of `moe_intermediate_size`, `num_experts_per_tok` per token, their
softmax weights renormalised only when `norm_topk_prob`; the other layers keep a dense MLP of
`intermediate_size`. No shared expert. Blocks in moe_blocks.py.

Hub checkpoints name each expert's linears `mlp.experts.N.{gate,up,down}_proj`; transformers 5
holds them as gate_up_proj / down_proj stacks (load.py reads both)."""

from qlora.models.families.moe_config import MoeSpec, num_experts, sparse_layer_flags

MODEL_TYPE = "qwen3_moe"
GGUF_ARCH = "QWEN3MOE"
# experts' rows a whole 4-bit block (64) wide: see mixtral.py
TINY_SIZES = {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
              "moe_intermediate_size": 64, "norm_topk_prob": True}


def spec_fields(cfg: dict) -> dict:
    layers, experts = cfg["num_hidden_layers"], num_experts(cfg, 128)
    moe = MoeSpec(
        num_experts=experts,
        top_k=int(cfg.get("num_experts_per_tok", 8)),
        expert_intermediate_size=int(cfg.get("moe_intermediate_size", 768)),
        sparse_layers=(sparse_layer_flags(layers, int(cfg.get("decoder_sparse_step", 1)),
                                          cfg.get("mlp_only_layers"))
                       if experts > 0 else (False,) * layers),
        renormalize=bool(cfg.get("norm_topk_prob", False)),
        aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.001)),
        aux_loss=bool(cfg.get("output_router_logits", False)),
        weights_in_hidden_dtype=True,
    )
    bias = bool(cfg.get("attention_bias", False))
    # transformers' Qwen3MoeConfig: the window (when use_sliding_window) in every layer
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
    return dict(qkv_bias=bias, o_bias=bias, qk_norm=True, sliding_window=window,
                layer_types=None, moe=moe)
