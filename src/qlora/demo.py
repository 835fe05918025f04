"""`qlora demo`: the whole path on the CPU in a few minutes, with nothing to download.

1. A small llama-family model is built on the spot (random weights, character tokenizer).
   Its base weights are random and stay frozen: everything it learns, it learns in the adapters.
2. A task it cannot do is generated deterministically: write a lowercase word in capitals
   (`cold -> COLD`). Train and held-out words are disjoint, so the held-out score measures a
   learned rule, not memorised pairs.
3. The base is quantized to 4-bit NF4 (double quantization); LoRA adapters go on every linear
   layer of the blocks; the adapters train with the same loop `qlora train` runs.
4. Held-out loss, perplexity and exact-match accuracy (greedy generation) before and after;
   the saved adapter is loaded again onto a fresh 4-bit base and must score the same.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import string
import time
from pathlib import Path
from typing import Callable

import torch

from qlora.config import RunConfig

# Sizes chosen so a 2-core CPU trains it in well under a minute. initializer_range 0.05 (not
# transformers' 0.02): the output head is frozen too, and with rows that small even a perfectly
# aimed hidden state cannot make a confident prediction, so the loss could not fall far.
MODEL_SIZES = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                   initializer_range=0.05)
N_TRAIN, N_HELD_OUT = 2000, 64
DEMO_RECORD = "demo.json"  # the figures; written first at the start, it marks the demo's folder
INPUT_FOLDERS = {"base-model", "data"}  # all that the demo puts in its inputs folder
DEFAULT_STEPS = 300
WORD_LENGTHS = (3, 4, 5, 6)
ALPHABET = string.ascii_lowercase


def make_words(seed: int = 0) -> tuple[list[str], list[str]]:
    """Distinct random lowercase words, split into train and held-out."""
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < N_TRAIN + N_HELD_OUT:
        words.add("".join(rng.choice(ALPHABET) for _ in range(rng.choice(WORD_LENGTHS))))
    ordered = sorted(words)
    rng.shuffle(ordered)
    return ordered[:N_TRAIN], ordered[N_TRAIN:]


def example(word: str) -> dict[str, str]:
    return {"prompt": f"{word} -> ", "completion": word.upper()}


def write_dataset(data_dir: Path) -> tuple[Path, Path]:
    train, held_out = make_words()
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, words in (("train.jsonl", train), ("held_out.jsonl", held_out)):
        path = data_dir / name
        path.write_text("".join(json.dumps(example(w)) + "\n" for w in words))
        paths.append(path)
    return paths[0], paths[1]


def demo_config(model_dir: Path, train_file: Path, val_file: Path, out_dir: Path,
                max_steps: int) -> RunConfig:
    return RunConfig(
        model=str(model_dir), data=str(train_file), val_data=str(val_file),
        max_seq_length=256, packing=True, quant="nf4", double_quant=True, dtype="float32",
        device="cpu", lora_r=16, lora_alpha=32, lora_dropout=0.0,
        # a random base needs larger steps than a pretrained one: lr 5e-3, not 2e-4
        learning_rate=5e-3, lr_scheduler_type="cosine", warmup_ratio=0.05, max_steps=max_steps,
        micro_batch_size=4, gradient_accumulation_steps=1, max_grad_norm=1.0,
        optim="adamw_torch", gradient_checkpointing=False, seed=0,
        eval_steps=max(1, max_steps // 4), save_steps=max(1, max_steps // 2), save_total_limit=1,
        # overwrite: prepare_output_dir empties a previous demo's folder; check_demo_folders
        # has refused every other non-empty one
        logging_steps=10, output_dir=str(out_dir), overwrite=True,
    )


def inputs_dir(out: Path) -> Path:
    """The base model and data of the demo at `out` live beside the run, not in it."""
    return out.parent / f".{out.name}-inputs"


def check_demo_folders(out: Path) -> None:
    """Refuse (QloraError), before any work, to replace a folder the demo did not write: the
    demo deletes its run folder `out` and its inputs folder, so each must be missing, empty, or
    a previous demo's. A training run or a user's files there are never lost."""
    from qlora.errors import QloraError
    from qlora.files import replaceable

    if not replaceable(out, lambda: (out / DEMO_RECORD).is_file()):
        raise QloraError(f"--out {out} is not empty and is not a folder a previous demo wrote (it "
                         f"has no {DEMO_RECORD}); the demo replaces only its own folders, so "
                         f"choose another --out, or remove {out} yourself")
    work = inputs_dir(out)
    if not replaceable(work, lambda: {c.name for c in work.iterdir()} <= INPUT_FOLDERS):
        raise QloraError(f"{work}, where the demo of --out {out} keeps its base model and data, "
                         f"holds files the demo did not write; choose another --out, or remove "
                         f"{work} yourself")


def held_out_scores(model, tokenizer, val_examples: list[dict], prompts: list[tuple[list[int], str]],
                    device: torch.device) -> dict[str, float]:
    """Loss, perplexity (teacher forcing) and exact match of greedy generations."""
    from qlora.train.evaluation import evaluate

    ev = evaluate(model, val_examples, max_len=256, batch_size=8,
                  pad_id=tokenizer.pad_token_id, device=device)
    new_tokens = greedy_batch(model, [ids for ids, _ in prompts], max_new_tokens=8,
                              eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    outputs = [tokenizer.decode(t, skip_special_tokens=True) for t in new_tokens]
    hits = sum(out.strip() == ref for out, (_, ref) in zip(outputs, prompts))
    return {"loss": ev["loss"], "perplexity": ev["perplexity"],
            "exact_match": hits / max(len(prompts), 1), "outputs": outputs}


@torch.no_grad()
def greedy_batch(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int,
                 pad_id: int) -> list[list[int]]:
    """Greedy decoding of many short prompts at once, one row each, without a KV cache.

    Rows are padded at the end; causal attention keeps the padding out of every real token's
    view, so each row's logits at its last real token are those of the prompt alone. On a CPU
    one batched forward per new token beats a cached single-prompt loop by far (the 4-bit
    weights are dequantized once per forward, not once per prompt). `qlora.infer.generate` is
    the reference: the demo prints a few of its generations beside these.
    """
    was_training = model.training
    model.eval()
    rows = [list(p) for p in prompts]
    done = [False] * len(rows)
    out: list[list[int]] = [[] for _ in rows]
    for _ in range(max_new_tokens):
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
        logits = model(ids, torch.arange(T).expand(len(rows), T))
        for i, r in enumerate(rows):
            if done[i]:
                continue
            token = int(logits[i, len(r) - 1].argmax())
            out[i].append(token)
            r.append(token)
            done[i] = token == eos_id
        if all(done):
            break
    model.train(was_training)
    return out


def _table(rows: list[tuple[str, dict]]) -> str:
    lines = [f"{'held-out':<22}{'loss':>8}{'perplexity':>12}{'exact match':>13}"]
    for name, s in rows:
        lines.append(f"{name:<22}{s['loss']:>8.3f}{s['perplexity']:>12.2f}"
                     f"{100 * s['exact_match']:>12.1f}%")
    return "\n".join(lines)


def run(out_dir: str | Path = "runs/demo", max_steps: int = 300, progress: bool = True,
        log: Callable[[str], None] = print) -> dict:
    """Build, quantize, train, evaluate, save, reload. Returns the figures (also in demo.json)."""
    from qlora.adapters import load_adapter, trainable_summary
    from qlora.data import encode_prompt, load_examples
    from qlora.infer import GenerationOptions, generate
    from qlora.models import load_model, load_tokenizer
    from qlora.quant import QuantConfig
    from qlora.tiny import build_tiny_model
    from qlora.train.data import load_data
    from qlora.train.loop import fit
    from qlora.train.model import build_model
    from qlora.train.output import prepare_output_dir, write_prompt_format

    t0 = time.perf_counter()
    torch.manual_seed(0)
    out = Path(out_dir)
    check_demo_folders(out)
    work = inputs_dir(out)
    if work.exists():
        shutil.rmtree(work)
    log("1/5 building a small llama-family model with random weights "
        f"({MODEL_SIZES['num_hidden_layers']} layers, hidden {MODEL_SIZES['hidden_size']}) ...")
    model_dir = build_tiny_model(work / "base-model", "llama", seed=0, **MODEL_SIZES)
    train_file, val_file = write_dataset(work / "data")
    log(f"2/5 task: capitalise a word ('cold -> ' => 'COLD'); {N_TRAIN} train words, "
        f"{N_HELD_OUT} held-out words never seen in training")

    cfg = demo_config(model_dir, train_file, val_file, out, max_steps)
    device = torch.device("cpu")
    prepare_output_dir(cfg)
    # marked now, not only when the figures are written at the end: an interrupted demo's
    # folder is still the demo's, and running the demo again replaces it
    (out / DEMO_RECORD).write_text(json.dumps({"finished": False}) + "\n")
    from qlora.config import CONFIG_FILE_NAME, save_config

    save_config(cfg, out / CONFIG_FILE_NAME)
    tokenizer = load_tokenizer(model_dir)
    train_examples, val_examples, (data_format, chat) = load_data(cfg, tokenizer,
                                                                  log=lambda s: None)
    # generate then renders as trained
    write_prompt_format(out, data_format, cfg.chat_template, chat=chat)
    raw, _ = load_examples(str(val_file))
    prompts = [encode_prompt(e, tokenizer) for e in raw]

    log("3/5 quantizing the base to NF4 (double quantization) and attaching LoRA adapters "
        f"(r={cfg.lora_r}, alpha={cfg.lora_alpha:g}, all linear layers)")
    model = build_model(cfg, device, torch.float32)
    log("    " + trainable_summary(model))
    before = held_out_scores(model, tokenizer, val_examples, prompts, device)
    log(f"4/5 training {max_steps} steps ...")
    t_train = time.perf_counter()
    result = fit(model, tokenizer, train_examples, val_examples, cfg, device=device,
                 log=log, progress=progress)
    train_s = time.perf_counter() - t_train
    if result.stopped == "interrupted":  # Ctrl-C or SIGTERM: no adapter to score and reload
        from qlora.errors import QloraError

        raise QloraError(f"the demo was interrupted at step {result.global_step} of {max_steps}; "
                         f"run `qlora demo` again to see it end to end")
    after = held_out_scores(model, tokenizer, val_examples, prompts, device)

    log(f"5/5 loading the saved adapter ({out}) onto a fresh 4-bit base ...")
    fresh = load_model(model_dir, QuantConfig(method="nf4", double_quant=True,
                                              compute_dtype=torch.float32), device=device)
    load_adapter(fresh, out)
    reloaded = held_out_scores(fresh, tokenizer, val_examples, prompts, device)
    same = (reloaded["outputs"] == after["outputs"]
            and math.isclose(reloaded["loss"], after["loss"], rel_tol=1e-5))

    log("")
    log(_table([("before training", before), ("after training", after),
                ("reloaded adapter", reloaded)]))
    log(f"reloaded adapter gives the same results: {'yes' if same else 'NO'}")
    log("")
    log("a few held-out words, generated with qlora.infer.generate (KV cache, greedy):")
    opts = GenerationOptions(max_new_tokens=8, eos_token_ids=(tokenizer.eos_token_id,))
    for (ids, ref), b in list(zip(prompts, before["outputs"]))[:6]:
        prompt = tokenizer.decode(ids, skip_special_tokens=True)
        a = tokenizer.decode(generate(fresh, ids, opts), skip_special_tokens=True)
        log(f"  {prompt!r:<14} before: {b!r:<12} after: {a!r:<10} "
            f"{'ok' if a.strip() == ref else 'wrong'}")
    wall = time.perf_counter() - t0
    figures = {
        "before": {k: v for k, v in before.items() if k != "outputs"},
        "after": {k: v for k, v in after.items() if k != "outputs"},
        "reloaded": {k: v for k, v in reloaded.items() if k != "outputs"},
        "reloaded_matches": same, "steps": result.global_step, "train_time_s": round(train_s, 1),
        "wall_time_s": round(wall, 1),
    }
    (out / DEMO_RECORD).write_text(json.dumps(figures, indent=2) + "\n")
    log(f"\ndone in {wall:.0f} s (training {train_s:.0f} s). The run directory {out}/ holds the "
        f"adapter (PEFT format), metrics.jsonl, loss.png and summary.json; the base model and the "
        f"data are in {work}/. Try the adapter yourself (generate renders the prompt as training "
        f"did, plain text here, from {out}/prompt_format.json):\n"
        f"  qlora generate --model {model_dir} --adapter {out} 'frog -> '")
    return figures
