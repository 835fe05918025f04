"""The model layer: architecture spec, the decoder, and streaming loading."""

from qlora.models.decoder import DecoderLM, KVCache
from qlora.models.load import load_generation_config, load_model, load_tokenizer
from qlora.models.spec import SUPPORTED_FAMILIES, ArchSpec, read_spec

__all__ = ["ArchSpec", "DecoderLM", "KVCache", "SUPPORTED_FAMILIES", "load_generation_config",
           "load_model", "load_tokenizer", "read_spec"]
