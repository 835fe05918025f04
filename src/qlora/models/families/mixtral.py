"""Mixtral (8x7B, 8x22B): Mistral's attention (the window, when set, in every layer) and a sparse
mixture-of-experts block in every layer: `num_local_experts` SwiGLU experts of
`intermediate_size`, `num_experts_per_tok` of them per token, their softmax weights always
renormalised. Blocks in moe_blocks.py (built through models/load.py's OWN_DECODERS).

Checkpoints on the Hub name the block `block_sparse_moe` and each expert's linears
`experts.N.w1` (gate), `w3` (up), `w2` (down); transformers 5 holds them as `mlp.experts`
gate_up_proj / down_proj stacks, which is what our module names follow (load.py reads both)."""

from qlora.models.families.moe_config import MoeSpec, num_experts

MODEL_TYPE = "mixtral"
GGUF_ARCH = "LLAMA"  # llama.cpp runs Mixtral as llama, the experts as ffn_{gate,up,down}_exps
# experts' rows a whole 4-bit block (64) wide: bitsandbytes 0.50.2's AVX-512 CPU dequantize
# misreads rows that are not whole blocks (seen at widths 32, 48, 96 and 160; 2026-12-07), and
# tests/test_moe.py compares the grouped experts with a loop that dequantizes through it
TINY_SIZES = {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 64}


def spec_fields(cfg: dict) -> dict:
    moe = MoeSpec(
        num_experts=num_experts(cfg, 8),
        top_k=int(cfg.get("num_experts_per_tok", 2)),
        expert_intermediate_size=int(cfg["intermediate_size"]),
        sparse_layers=(True,) * cfg["num_hidden_layers"],
        renormalize=True,
        aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.001)),
        aux_loss=bool(cfg.get("output_router_logits", False)),
        jitter_noise=float(cfg.get("router_jitter_noise") or 0.0),
        weights_in_hidden_dtype=False,
    )
    return dict(qkv_bias=False, o_bias=False, qk_norm=False,
                sliding_window=cfg.get("sliding_window"), layer_types=None, moe=moe)
