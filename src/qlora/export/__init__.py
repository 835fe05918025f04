"""Writing a model for other runtimes: GGUF for llama.cpp (gguf.py; k-quants in kquants.py, llama.cpp's
type mixtures in mixtures.py, the importance matrix in imatrix.py), an Ollama Modelfile (ollama.py),
and the check that the output is the trained model (check.py, comparing as parity.py says);
pipeline.py runs them in the order `qlora export` does."""

from qlora.export.gguf import QTYPES, export_gguf

__all__ = ["QTYPES", "export_gguf"]
