"""Data: files → Examples (formats) → token ids + labels (templates) → packed batches (packing)."""

from qlora.data.formats import FORMATS, Example, Problem, detect_format, load_examples, summarize_problems
from qlora.data.packing import (batch_order, build_rows, iterate_batches, make_batch, micro_batch, num_batches,
                                pack_examples, unpacked_rows)
from qlora.data.templates import (CHATML_TEMPLATE, IGNORE, PrepareReport, alpaca_prompt, encode_example,
                                  encode_prompt, prepare, resolve_chat_template, split_validation)

__all__ = [
    "FORMATS", "Example", "Problem", "detect_format", "load_examples", "summarize_problems",
    "batch_order", "build_rows", "iterate_batches", "make_batch", "micro_batch", "num_batches", "pack_examples",
    "unpacked_rows", "CHATML_TEMPLATE", "IGNORE", "PrepareReport", "alpaca_prompt", "encode_example",
    "encode_prompt", "prepare", "resolve_chat_template", "split_validation",
]
