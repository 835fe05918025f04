"""The supported families, one small module each: what its config.json means for ArchSpec beyond
the fields every family shares, and the names other formats give it.

Each module defines
- MODEL_TYPE: config.json's `model_type`;
- spec_fields(cfg) -> dict: the ArchSpec fields this family sets its own way;
- GGUF_ARCH: the architecture llama.cpp runs it as (a gguf.MODEL_ARCH member's name);
- TINY_SIZES: what a tiny random test model of it needs beyond the shared tiny sizes.

Adding a family: a module here, its line in FAMILIES, and its tests (its line in VARIANTS of
tests/conftest.py, whose tiny models tests/test_model.py compares with transformers'). A family
whose blocks differ from the reference decoder's puts its block classes in a module of its own.

Gemma 2 and Gemma 3's blocks live in gemma.py, which this package does not import (it builds on
models/decoder.py, which reads specs through this package: an import cycle otherwise);
models/load.py's OWN_DECODERS names their LM class for new_decoder. gemma_config.py reads what
their config.json means, for their family modules and their blocks alike. Phi-3's blocks (fused
qkv_proj and gate_up_proj, partial rotary, LongRoPE) are in phi3_blocks.py for the same reason;
phi3.py also names its block's linears (LINEARS, linear_shapes), which ArchSpec.linear_shapes
asks of a family that has them.
Mixtral's and Qwen3-MoE's sparse blocks are in moe_blocks.py for the same reason; what their
config.json means (MoeSpec: experts, top_k, renormalisation, dense layers, the aux loss) is read
in moe_config.py, which their family modules share.
"""

from __future__ import annotations

from qlora.models.families import (gemma2, gemma3, llama, mistral, mixtral, phi3, qwen2, qwen3,
                                   qwen3_moe)

FAMILIES = {module.MODEL_TYPE: module for module in (llama, mistral, qwen2, qwen3, gemma2, gemma3,
                                                        phi3, mixtral, qwen3_moe)}
