"""The model an export or a merge is measured against: base + adapter in our own engine.

Which base: the one the merge folds the adapter into (`--base`). With `original` (the default) the
merged weights are W + ΔW, so the reference holds the base in its stored 16-bit precision
(quant "none") with the adapter on top; with `nf4` it holds the base in NF4, as QLoRA training saw
it. Either way the comparison isolates what merge and export add (folding, rounding to the file's
types, llama.cpp's arithmetic), not the gap between the 16-bit and the NF4 base, which
docs/MERGE_AND_EXPORT.md measures on its own.
"""

from __future__ import annotations

from pathlib import Path


def reference_quant(merge_base: str) -> str:
    from qlora.merge import normalise_base

    return "nf4" if normalise_base(merge_base) == "dequantized-nf4" else "none"


def load_reference(model_dir: str | Path, adapter_dir: str | Path | None, merge_base: str = "original",
                   device: str = "auto"):
    """(model, tokenizer, description) of base (+ adapter) as the merge sees it, ready to run."""
    from qlora.infer import load_for_inference

    quant = reference_quant(merge_base)
    model, tokenizer = load_for_inference(model_dir, adapter_dir, quant=quant, device=device)
    base = "the NF4 base" if quant == "nf4" else "the 16-bit base"
    what = f"{base} + adapter" if adapter_dir is not None else base
    return model, tokenizer, f"{what} in qlora"
