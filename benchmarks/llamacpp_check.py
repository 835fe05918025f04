"""Does llama.cpp read our GGUF files and compute what transformers computes?

Builds tiny random models of the native families (llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3,
phi3 with LongRoPE, and the mixtures of experts mixtral and qwen3_moe) or of the generic path's
(`--families generic`: gpt2, gpt_neox, olmo, granite, gemma and variants), exports each with
`qlora.export.export_gguf`, loads the files in llama.cpp through llama-cpp-python, and compares on
the same token ids:
  (a) logits at every position (llama.cpp `logits_all=True`) vs transformers fp32, and vs transformers
      fp32 running the GGUF's own dequantized weights (which separates llama.cpp's arithmetic from the
      quantization error of the file type);
  (b) 20 greedy tokens from a prompt given as ids: llama.cpp (argmax of its logits, and its own greedy
      sampler) vs transformers `generate` and `qlora.infer.generate`;
  (c) tokenization of a sample string by llama.cpp vs the tokenizer's own ids (and detokenization).

llama-cpp-python is not a project dependency. Build it in its own virtualenv and point at its python:

    python -m venv /tmp/llamacpp-venv
    /tmp/llamacpp-venv/bin/pip install numpy scikit-build-core cmake ninja typing-extensions diskcache jinja2
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
        /tmp/llamacpp-venv/bin/pip install --no-build-isolation --no-deps llama_cpp_python-0.3.36.tar.gz
    .venv/bin/python benchmarks/llamacpp_check.py --llama-python /tmp/llamacpp-venv/bin/python

This file runs in two roles: the driver (project venv: torch, transformers, qlora) and, with
`--worker`, the llama.cpp side (only numpy and llama_cpp imported), started as a subprocess so the
two environments never mix and a crash inside llama.cpp is reported instead of killing the driver.
Not imported by the tests.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SIZES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2)
_SLIDING, _FULL = "sliding_attention", "full_attention"
# each family's test model as llama.cpp runs that architecture: Gemma's query scale equal to
# head_dim and its layer pattern (Gemma 2 every 2nd layer full, Gemma 3 every 6th), Gemma 3
# without a final cap (the export refuses any other, gguf.gemma_settings); windows shorter than
# the text, so that the sliding layers' masks matter
EXTRA = {"qwen3": {"head_dim": 64},
         "gemma2": {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 16,
                    "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                    "layer_types": [_SLIDING, _FULL]},
         "gemma3_text": {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 16,
                         "num_hidden_layers": 6, "sliding_window_pattern": 6,
                         "final_logit_softcapping": None, "layer_types": [_SLIDING] * 5 + [_FULL]},
         "phi3": {},
         # the experts' widths whole k-quant blocks (256), as real models' are; 4 experts, 2 a token
         "mixtral": {"intermediate_size": 256},
         "qwen3_moe": {"head_dim": 64, "moe_intermediate_size": 256},
         # LongRoPE on every rotated frequency, an original context (8) shorter than the 12-token
         # prompt: transformers takes the long factors for every forward here, as llama.cpp does
         # for a context (256) past the original one; the factors unlike each other and unlike 1
         "phi3-longrope": {"original_max_position_embeddings": 8,
                           "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                               "short_factor": [1.0 + 0.25 * i for i in range(32)],
                                               "long_factor": [2.0 + 1.5 * i for i in range(32)]}}}
# the generic path's models (models/generic.py), built by transformers' own config class with
# their own size names; settings unlike transformers' defaults where llama.cpp reads them from the
# file (Granite's multipliers, OLMo's clip), so that a key written wrong or left out shows
_GENERIC_BLOCK = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                      num_hidden_layers=2, max_position_embeddings=256)
GENERIC = {
    "gpt2": dict(n_embd=256, n_layer=2, n_head=4, n_positions=256),
    "gpt_neox": _GENERIC_BLOCK,  # rotary on a quarter of each head, parallel residual
    "gpt_neox-sequential": {**_GENERIC_BLOCK, "use_parallel_residual": False},
    "olmo": {**_GENERIC_BLOCK, "num_key_value_heads": 2},
    "olmo-clip": {**_GENERIC_BLOCK, "num_key_value_heads": 2, "clip_qkv": 1.0},
    "granite": {**_GENERIC_BLOCK, "num_key_value_heads": 2, "embedding_multiplier": 2.0,
                "residual_multiplier": 0.5, "attention_multiplier": 0.1, "logits_scaling": 2.0},
    "gemma": {**_GENERIC_BLOCK, "num_key_value_heads": 2, "head_dim": 64},
}
GENERIC_FAMILIES = ",".join(GENERIC)
# a variant of a family: the model_type it builds
FAMILY_OF = {"phi3-longrope": "phi3", "gpt_neox-sequential": "gpt_neox", "olmo-clip": "olmo"}
TEXT = "Hello, world! The quick brown fox\njumps over 13 lazy dogs.\t(ok?) ~{x}_y"
SPECIAL_TEXT = "<|im_start|>user\nhi there<|im_end|>\n"
PROMPT_LEN = 12
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"}]


# --- the llama.cpp side (runs in the llama_cpp python) -----------------------------------------
def worker(job_file: str) -> None:
    import llama_cpp

    job = json.loads(Path(job_file).read_text())
    out_dir = Path(job["out_dir"])
    info = {"version": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace")}
    llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=256, n_batch=256, n_ubatch=256,
                          logits_all=True, n_threads=2, seed=0, verbose=False)
    info["metadata_keys"] = sorted(llm.metadata)
    info["chat_template_in_metadata"] = "tokenizer.chat_template" in llm.metadata
    info["n_vocab"] = llm.n_vocab()

    def save():
        (out_dir / "result.json").write_text(json.dumps(info))

    if job["task"] == "tokenize":
        # the chat template from the file, rendered by llama.cpp's C API (built-in template chosen by
        # looking at the template text) and by llama-cpp-python's Jinja2 formatter
        import ctypes

        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        tmpl = llm.metadata["tokenizer.chat_template"]
        chat = (llama_cpp.llama_chat_message * len(MESSAGES))(
            *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in MESSAGES])
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_chat_apply_template(tmpl.encode(), chat, len(MESSAGES), True, buf, 4096)
        info["chat_c_api"] = buf.raw[:n].decode() if n >= 0 else f"error {n}"
        fmt = Jinja2ChatFormatter(tmpl, eos_token="</s>", bos_token="<s>", add_generation_prompt=True)
        info["chat_jinja"] = fmt(messages=MESSAGES).prompt
        info["bos"], info["eos"] = llm.token_bos(), llm.token_eos()
        save()  # what we have so far, in case tokenizing aborts inside llama.cpp
        info["detok"] = llm.detokenize(job["ids"]).decode("utf-8", errors="replace")
        save()
        for key, text, special in (("plain", TEXT, False), ("special", SPECIAL_TEXT, True)):
            info[f"tok_{key}"] = llm.tokenize(text.encode(), add_bos=False, special=special)
            save()
    else:
        ids, prompt, steps = job["ids"], job["ids"][:PROMPT_LEN], job["steps"]
        llm.eval(ids)
        np.save(out_dir / "logits.npy", np.array(llm.scores[: len(ids)], dtype=np.float32))
        llm.reset()
        llm.eval(prompt)
        greedy = []
        for _ in range(steps):  # argmax of llama.cpp's own logits, no EOS stop
            greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([greedy[-1]])
        info["greedy_argmax"] = greedy
        sampled = []  # llama.cpp's sampler chain at temperature 0 (greedy)
        for t in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                              reset=True):
            sampled.append(int(t))
            if len(sampled) == steps:
                break
        info["greedy_sampler"] = sampled
    save()


def run_worker(llama_python: str, job: dict, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    job = {**job, "out_dir": str(work)}
    (work / "job.json").write_text(json.dumps(job))
    p = subprocess.run([llama_python, __file__, "--worker", str(work / "job.json")],
                       capture_output=True, text=True)
    res = json.loads((work / "result.json").read_text()) if (work / "result.json").exists() else {}
    if p.returncode != 0:
        res["error"] = f"rc={p.returncode}: {p.stderr.strip()[-600:]}"
    if (work / "logits.npy").exists():
        res["logits"] = np.load(work / "logits.npy")
    return res


# --- the reference side (project venv) ---------------------------------------------------------
def build_generic_model(out: Path, family: str, init_std: float) -> Path:
    """A random model of a generic-path family with the tiny tokenizer (ChatML template)."""
    from qlora.tiny import build_tiny_generic

    return build_tiny_generic(out, FAMILY_OF.get(family, family), initializer_range=init_std,
                              **GENERIC[family])


def hf_model_on_gguf_weights(gguf_file: Path, model_dir: Path, work: Path):
    """transformers' model of model_dir holding the GGUF's tensors dequantized to fp32
    (qlora.export.check's reader, what `--check-engine qlora` runs), written as a checkpoint of
    the source's names and loaded by from_pretrained: its name mapping (a mixture of experts'
    per-expert tensors into transformers' stacked ones) and a tied head, as for the source."""
    import shutil

    from safetensors.torch import save_file

    from qlora.export.check import gguf_state_dict

    work.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        shutil.copy(model_dir / name, work / name)
    state = {k: v.contiguous() for k, v in gguf_state_dict(gguf_file, model_dir).items()}
    save_file(state, str(work / "model.safetensors"), metadata={"format": "pt"})
    return hf_model(work)


def hf_model(model_dir: Path):
    """transformers' fp32 model of model_dir, every weight read from its files: none left at its
    random initialisation, none ignored."""
    from transformers import AutoModelForCausalLM
    import torch

    model, info = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    unread = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys") and v}
    if unread:
        raise RuntimeError(f"{model_dir}: the checkpoint's weights do not fill the model: {unread}")
    return model.eval()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def hf_greedy(model, prompt: list[int], steps: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def qlora_greedy(model_dir: Path, prompt: list[int], steps: int) -> list[int]:
    from qlora.infer import GenerationOptions, generate, load_for_inference

    model, _ = load_for_inference(model_dir, quant="none", device="cpu")
    return generate(model, prompt, GenerationOptions(max_new_tokens=steps, temperature=0.0))


def compare(got: np.ndarray, want: np.ndarray) -> dict:
    """The differences; where the argmax differs, `near_ties` gives the reference's gap between
    its best logit and the one `got` picks (a near tie: a gap within the logits' error)."""
    d = got - want
    parted = np.nonzero(got.argmax(-1) != want.argmax(-1))[0]
    gaps = want[parted, want.argmax(-1)[parted]] - want[parted, got.argmax(-1)[parted]]
    return {"max_abs": float(np.abs(d).max()), "max_ref": float(np.abs(want).max()),
            "rel_rms": float(np.sqrt((d**2).mean()) / np.sqrt((want**2).mean())),
            "argmax_agree": float((got.argmax(-1) == want.argmax(-1)).mean()),
            "near_ties": [round(float(g), 4) for g in gaps]}


def agree(a: list[int], b: list[int]) -> str:
    """'20/20' or the first position where they part."""
    n = min(len(a), len(b))
    first = next((i for i in range(n) if a[i] != b[i]), None)
    return f"{n}/{n}" if first is None and len(a) == len(b) else f"same up to {first if first is not None else n}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-python", default=sys.executable,
                    help="a python that can import llama_cpp (default: this one)")
    ap.add_argument("--families", default="llama,mistral,qwen2,qwen3,gemma2,gemma3_text,phi3,phi3-longrope,"
                                            "mixtral,qwen3_moe",
                    help="comma-separated; 'generic' stands for the generic path's "
                         f"{GENERIC_FAMILIES}")
    ap.add_argument("--types", default="f16,q8_0", help="file types for every family")
    ap.add_argument("--q4km-family", default="llama,mixtral,qwen3_moe",
                    help="the families (comma-separated) also exported as q4_k_m")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--init-std", type=float, default=0.1,
                    help="initializer_range of the random models: larger than transformers' 0.02 so "
                         "that greedy tokens are decided by clear logit gaps, not by rounding")
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)

    import torch
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from qlora.export.gguf import export_gguf
    from qlora.tiny import build_tiny_model

    torch.manual_seed(0)
    report = {"runs": []}
    with tempfile.TemporaryDirectory(prefix="llamacpp_check.") as tmp:
        root = Path(tmp)
        for family in args.families.replace("generic", GENERIC_FAMILIES).split(","):
            # not named after the family: llama.cpp reads general.name (the folder's name), and
            # for a name holding "phi3" it looks up Phi-3's <|end|> token, which the tiny
            # vocabulary lacks
            folder = root / f"tiny-model-{len(report['runs'])}"
            torch.manual_seed(0)
            if family in GENERIC:
                model_dir = build_generic_model(folder, family, args.init_std)
            else:
                model_dir = build_tiny_model(folder, FAMILY_OF.get(family, family),
                                             initializer_range=args.init_std,
                                             **{**SIZES, **EXTRA.get(family, {})})
            tok = AutoTokenizer.from_pretrained(str(model_dir))
            # the reference ids come from tokenizer.json itself (what the exporter reads); for a
            # qwen2 model_type transformers 5 picks Qwen2Tokenizer, which re-tokenizes differently
            raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
            ids = raw.encode(TEXT, add_special_tokens=False).ids
            prompt = ids[:PROMPT_LEN]
            model = hf_model(model_dir)
            ref = hf_logits(model, ids)
            ref_greedy = hf_greedy(model, prompt, args.steps)
            ours_greedy = qlora_greedy(model_dir, prompt, args.steps)
            types = args.types.split(",") + (["q4_k_m"] if family in args.q4km_family.split(",") else [])
            for qtype in types:
                gguf_file = export_gguf(model_dir, root / f"{family}-{qtype}.gguf", qtype)
                res = run_worker(args.llama_python, {"task": "model", "gguf": str(gguf_file), "ids": ids,
                                                     "steps": args.steps}, root / f"w-{family}-{qtype}")
                row = {"family": family, "type": qtype, "hf_greedy": ref_greedy, "qlora_greedy": ours_greedy}
                if "error" in res:
                    row["error"] = res["error"]
                else:
                    deq = hf_model_on_gguf_weights(gguf_file, model_dir, root / f"d-{family}-{qtype}")
                    row.update(version=res["version"], vs_hf=compare(res["logits"], ref),
                               vs_hf_on_gguf_weights=compare(res["logits"], hf_logits(deq, ids)),
                               gguf_weights_vs_hf=compare(hf_logits(deq, ids), ref),
                               hf_on_gguf_greedy=hf_greedy(deq, prompt, args.steps),
                               cpp_greedy=res["greedy_argmax"], cpp_sampler=res["greedy_sampler"],
                               chat_template=res["chat_template_in_metadata"])
                report["runs"].append(row)
                print(json.dumps({k: v for k, v in row.items() if not k.endswith("greedy")
                                  and k != "cpp_sampler"}), flush=True)
            res = run_worker(args.llama_python, {"task": "tokenize", "gguf": str(root / f"{family}-f16.gguf"),
                                                 "ids": ids}, root / f"t-{family}")
            tokrow = {"family": family, "hf_plain": ids, "hf_chat": tok.apply_chat_template(
                          MESSAGES, tokenize=False, add_generation_prompt=True),
                      "hf_special": raw.encode(SPECIAL_TEXT, add_special_tokens=False).ids,
                      "auto_plain": tok(TEXT, add_special_tokens=False)["input_ids"], **res}
            report.setdefault("tokenize", []).append(tokrow)

    print("\n| family | type | vs transformers fp32: max abs / max ref, rel RMS, argmax | "
          "vs transformers on the GGUF's weights: max abs, rel RMS | greedy 20: llama.cpp vs "
          "transformers / vs qlora.infer / llama.cpp sampler / vs transformers on GGUF weights |")
    print("|---|---|---|---|---|")
    for r in report["runs"]:
        if "error" in r:
            print(f"| {r['family']} | {r['type']} | ERROR {r['error'][:200]} | | |")
            continue
        a, b = r["vs_hf"], r["vs_hf_on_gguf_weights"]
        print(f"| {r['family']} | {r['type']} | {a['max_abs']:.2e} / {a['max_ref']:.2f}, {a['rel_rms']:.1e}, "
              f"{a['argmax_agree']:.3f} | {b['max_abs']:.2e}, {b['rel_rms']:.1e} | "
              f"{agree(r['cpp_greedy'], r['hf_greedy'])} / {agree(r['cpp_greedy'], r['qlora_greedy'])} / "
              f"{agree(r['cpp_sampler'], r['cpp_greedy'])} / {agree(r['cpp_greedy'], r['hf_on_gguf_greedy'])} |")
    print("\ntokenizer and chat template (llama.cpp vs tokenizer.json / transformers' chat template):")
    for t in report.get("tokenize", []):
        if "error" in t:
            print(f"  {t['family']}: llama.cpp stopped: {t['error']}")
        if t["auto_plain"] != t["hf_plain"]:
            print(f"  {t['family']}: NOTE transformers' AutoTokenizer gives other ids than tokenizer.json: "
                  f"{t['auto_plain']}")
        checks = [("detokenize the ids", t.get("detok"), TEXT),
                  ("tokenize plain text", t.get("tok_plain"), t["hf_plain"]),
                  ("tokenize with special tokens", t.get("tok_special"), t["hf_special"]),
                  ("chat template, llama.cpp C API", t.get("chat_c_api"), t["hf_chat"]),
                  ("chat template, llama-cpp-python Jinja2", t.get("chat_jinja"), t["hf_chat"])]
        for what, got, want in checks:
            verdict = "not reached" if got is None else "same" if got == want else "DIFFERENT"
            print(f"  {t['family']}: {what}: {verdict}")
            if got is not None and got != want:
                print(f"      transformers {want!r}\n      llama.cpp    {got!r}")
    if report["runs"] and "version" in report["runs"][0]:
        print(f"\nllama-cpp-python {report['runs'][0]['version']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=lambda x: None))


if __name__ == "__main__":
    main()
