"""Which base should `qlora merge` fold into? Measures both against the adapter model's logits.

    .venv/bin/python scripts/measure_merge_base.py

Builds a tiny llama (hidden 256, 4 layers), a LoRA and a DoRA adapter with random B (std 0.02),
then compares logits (fp32) of:
  peft16   PeftModel on the 16-bit (here fp32) base
  peft4    PeftModel on the transformers + bitsandbytes NF4 base (double quant, blocksize 64)
  peft4x   PeftModel on a base holding exactly the NF4 round-trip weights, in fp32 (peft4 without
           the bitsandbytes CPU 4-bit matmul's own rounding)
  orig/nf4 our merge into the original / the dequantized-NF4 weights (fp32 and bf16 output)
Prints the max |Δlogit| and the RMS of Δ relative to the RMS of the logits.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_merge import _make_adapter  # noqa: E402  (the same adapters as the tests)

from qlora.merge import is_quantized_linear, merge_adapter, nf4_round_trip  # noqa: E402
from qlora.tiny import build_tiny_model  # noqa: E402


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def main():
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    root = Path(tempfile.mkdtemp())
    model = build_tiny_model(root / "base", "llama", hidden_size=256, intermediate_size=512,
                             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
    torch.manual_seed(0)
    ids = torch.randint(6, 100, (4, 64))
    fp32 = dict(dtype=torch.float32)
    q4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    rows = []
    for kind in ("lora", "dora"):
        adapter = _make_adapter(model, root / f"ad-{kind}", kind)
        ref = {}
        ref["peft16"] = logits_of(peft.PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(model), **fp32), str(adapter)).eval(), ids)
        ref["peft4"] = logits_of(peft.PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(model), quantization_config=q4, **fp32),
            str(adapter)).eval(), ids)
        base = AutoModelForCausalLM.from_pretrained(str(model), **fp32)
        with torch.no_grad():
            for n, p in base.named_parameters():
                if is_quantized_linear(n, tuple(p.shape)):
                    p.copy_(nf4_round_trip(p.data))
        ref["peft4x"] = logits_of(peft.PeftModel.from_pretrained(base, str(adapter)).eval(), ids)
        for mbase in ("original", "nf4"):
            for dtype in ("float32", "bfloat16"):
                out = merge_adapter(model, adapter, root / f"m-{kind}-{mbase}-{dtype}", dtype=dtype, base=mbase)
                got = logits_of(AutoModelForCausalLM.from_pretrained(str(out), **fp32).eval(), ids)
                for rname, r in ref.items():
                    d = got - r
                    rows.append(dict(adapter=kind, merge_base=mbase, dtype=dtype, vs=rname,
                                     max_abs=float(d.abs().max()),
                                     rel_rms=float(d.pow(2).mean().sqrt() / r.pow(2).mean().sqrt()),
                                     argmax_agree=float((got.argmax(-1) == r.argmax(-1)).float().mean())))
    print(f"{'adapter':7} {'merge base':10} {'dtype':9} {'vs':7} {'max|Δ|':>9} {'rel RMS':>9} {'argmax=':>7}")
    for r in rows:
        print(f"{r['adapter']:7} {r['merge_base']:10} {r['dtype']:9} {r['vs']:7} {r['max_abs']:9.2e} "
              f"{r['rel_rms']:9.2e} {r['argmax_agree']:7.3f}")
    json.dump(rows, sys.stderr)


if __name__ == "__main__":
    main()
