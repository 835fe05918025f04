"""The supported families, one small module each: what its config.json means for ArchSpec beyond
the fields every family shares, and the names other formats give it.

Each module defines
- MODEL_TYPE: config.json's `model_type`;
- spec_fields(cfg) -> dict: the ArchSpec fields this family sets its own way;
- GGUF_ARCH: the architecture llama.cpp runs it as (a gguf.MODEL_ARCH member's name);
- TINY_SIZES: what a tiny random test model of it needs beyond the shared tiny sizes.

Adding a family: a module here, its line in FAMILIES, and its tests (tests/test_model.py builds a
tiny model of every family in FAMILIES and compares its logits with transformers'). A family whose
blocks differ from the reference decoder's also gets its block classes in its module.
"""

from __future__ import annotations

from qlora.models.families import llama, mistral, qwen2, qwen3

FAMILIES = {module.MODEL_TYPE: module for module in (llama, mistral, qwen2, qwen3)}
