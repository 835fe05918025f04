"""Writing a model for other runtimes: GGUF for llama.cpp (gguf.py, with our k-quants in kquants.py)."""

from qlora.export.gguf import QTYPES, export_gguf

__all__ = ["QTYPES", "export_gguf"]
