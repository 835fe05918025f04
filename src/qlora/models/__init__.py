"""The model layer: architecture spec, the decoder, streaming loading, and the generic path for
the causal LMs transformers builds itself."""

from qlora.models.decoder import DecoderLM, KVCache
from qlora.models.generic import GenericLM, GenericSpec
from qlora.models.load import load_generation_config, load_model, load_tokenizer, read_model_spec
from qlora.models.spec import SUPPORTED_FAMILIES, ArchSpec, read_spec

__all__ = ["ArchSpec", "DecoderLM", "GenericLM", "GenericSpec", "KVCache", "SUPPORTED_FAMILIES",
           "load_generation_config", "load_model", "load_tokenizer", "read_model_spec", "read_spec"]
