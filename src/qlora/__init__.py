"""qlora: fine-tune open LLMs on one GPU with a 4-bit base and LoRA / rsLoRA / DoRA adapters."""

__version__ = "0.1.0"
