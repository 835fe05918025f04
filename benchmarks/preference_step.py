"""Time one DPO, ORPO or KTO training step (`--method`; DPO: policy forward + backward, reference
forward, optimizer step; ORPO: no reference forward; KTO: its examples' forward + backward, their
KL sequences' forward and both reference forwards) for several systems side by side:
train_step.py's harness for preference pairs.

Every system runs in its own subprocess on the same random-weight checkpoint (real shapes, made by
train_step.py), with the same pairs, seed and LoRA configuration (NF4 + double quant, r 16, alpha 32,
dropout 0.05 on all seven projections, paged 8-bit AdamW, lr 2e-4, clipping at 0.3, gradient
checkpointing); DPO sigmoid with beta 0.1 and the reference being the base with the adapters off,
ORPO with lambda = `--beta` (TRL's name for it), or KTO with beta 0.1, desirable and undesirable
weights 1 and the same reference.

ORPO's NLL term: TRL's ORPOTrainer (as the authors' code, xfactlab/orpo, by default) takes it over
the whole chosen sequence, prompt included; qlora over the chosen completion only (its
methods/orpo.py: the authors' --disable_prompt_loss). The odds-ratio term is the same on both
sides. So the two losses differ by that NLL difference (the test computes it), and TRL's step
computes the prompt's logits too, which qlora's fast path leaves out.

Systems
  trl           TRL's DPOTrainer on transformers + peft + bitsandbytes as the seeds set the model up
                (train_step.py's `hf`: BitsAndBytesConfig, prepare_model_for_kbit_training with
                non-reentrant checkpointing), the LoRA config handed to the trainer (so that its
                reference is the adapter switched off), bf16, its dropout left on
                (disable_dropout=False); its padded [chosen; rejected] batch from its own collator;
                one step = Trainer.training_step (forward, reference forward, backward), clipping,
                bitsandbytes' PagedAdamW8bit. ORPO: TRL's ORPOTrainer, built and stepped alike
                (no reference), its own collator fed rows shaped as its tokenize_row makes them.
                KTO: TRL's KTOTrainer alike (loss_type "kto", precompute_ref_log_probs False,
                max_length None), its collator fed the rows its _prepare_dataset makes
                (kto_rows); one step = its four forwards (the KL sequences' under no_grad, the
                examples' with grad, both again with the adapter off), backward.
  unsloth       Unsloth's FastLanguageModel + get_peft_model, PatchDPOTrainer(), TRL's DPOTrainer
                on that model (a model handed over already wrapped: TRL's reference is a frozen copy
                of the fresh adapter, which equals the base at the start), the same step; ORPO:
                PatchDPOTrainer() then TRL's ORPOTrainer on that model, as Unsloth's ORPO
                notebook does; KTO: PatchKTOTrainer() then TRL's KTOTrainer on that model
                (its reference: the frozen copy of the fresh adapter, as for DPO).
  qlora         this project as `qlora train --method dpo|orpo` runs a micro-batch: the speed layer as
                train_step.py's `qlora` puts it, CUDA graphs included where train/graphs.py allows
                them (CUDA: one graph per micro-batch shape holding the method's batch loss,
                methods/preference.staged_batch_loss, its label positions staged on the host;
                the first step of a shape captures it, so --warmup 2 leaves the capture out of
                the times, and --ragged may capture in timed steps), methods/preference.batch_loss
                eagerly elsewhere, over the pairs packed into one row where the attention runs
                flash varlen (CUDA), the reference (DPO) in one no-grad forward with the adapters
                off, the flattened adapters' paged 8-bit AdamW. On the CPU (the test) the base is
                the unquantized fp32 model, as TRL's is there (no bitsandbytes config on the CPU;
                prepare_model_for_kbit_training upcasts it to fp32), and no graphs.
  qlora-eager   the same with CUDA graphs off (qlora train before it captured preference steps):
                beside `qlora`, what the graphs save.
  qlora-padded  `qlora` over padded rows (one sequence per row).
  qlora-whole   `qlora` packed with every sequence whole: each pair's prompt twice, once before
                each completion (qlora train's layout before it packed each prompt once): beside
                `qlora`, what sharing the prompt saves.
  qlora-nockpt  `qlora` without gradient checkpointing, one pair a forward and backward, the
                `--pairs` of a step accumulated before its one optimizer step (qlora train's
                --micro_batch_size 1 --gradient_accumulation_steps P --gradient_checkpointing
                false): the same update from the same pairs without the recompute (a quarter of a
                layer's GEMMs), at the memory of one pair's activations (`qlora plan --method dpo
                --seq-len 1024 --prompt-len 512 --micro-batch 1 --no-checkpointing`: 11.65 GiB at
                Llama-3-8B, against 11.90 for `qlora`; measured 12.74 and 11.86 on an H100,
                2026-12-07, where it ran 0.96x `qlora`, both with the graph's staging then padding
                an aligned row by 256 tokens: 1,792 for this one pair's 1,536, since 1,552).
                Pair methods only: KTO's KL estimate
                borrows completions within its micro-batch, so splitting one changes the loss.

Data: `--pairs` pairs of random token ids, a prompt of `--prompt` tokens and two completions of
`--completion` tokens each (`--ragged`: each completion's length drawn from [completion/4,
completion], where padding costs and packing saves it). tokens/s counts the real tokens of a step
(both sequences of every pair, no padding); examples/s the pairs. KTO: `--pairs` unpaired examples
a step, each a prompt and one completion, desirable and undesirable by turns; its tokens are both
sequences of each (the example and its KL sequence: both go through the model; the planner
saves activations for the example's alone, the KL sequence's forward being under no_grad).

KTO's KL estimate, TRL's and ours: the same mismatched sequences. TRL's _prepare_dataset gives
example i of each per_device_train_batch_size rows the completion of example i - 1 (the first the
last's), and its collator makes each KL sequence prompt i + that completion; qlora's
data/preference.unpaired_batch rotates the micro-batch's completions the same way, so at one
micro-batch a step the two estimate z over the same sequences, detached and clamped at 0 alike.
They differ in how the sequences go through the model: TRL pads the examples and the KL sequences
each to their longest and runs four forwards (policy KL no_grad, policy, reference KL, reference);
qlora runs the same four over the halves of one batch, packed into one row each where flash varlen
runs. Where they would part (not here): at a micro-batch of one TRL refuses to run (no other
completion to borrow) where qlora's KL row is the example's own completion; and TRL rotates in
fixed dataset-order blocks of per_device_train_batch_size (its sampler is sequential), qlora within
each micro-batch as its loader makes it.

Usage (GPU machine, the carried .site as in train_step.py):
  python benchmarks/preference_step.py --shapes llama-3-8b --systems qlora,trl,unsloth --out $OUT
  python benchmarks/preference_step.py --method orpo --shapes llama-3-8b --systems qlora,trl,unsloth \
      --out $OUT
  python benchmarks/preference_step.py --method orpo --shapes qwen2.5-1.5b \
      --systems qlora,qlora-eager,unsloth --out $OUT   # the graphs' gain, side by side
  python benchmarks/preference_step.py --method kto --shapes qwen2.5-1.5b \
      --systems qlora,qlora-eager,trl,unsloth --out $OUT   # KTO: the graphs' gain, TRL, Unsloth
  python benchmarks/preference_step.py --device cpu --shapes tiny-llama --prompt 16 --completion 16 \
      --pairs 2 --systems trl,qlora --out /tmp/pref   # the harness on a CPU (the test does this)
Each finished (system, shape) appends one JSON line to OUT/results.jsonl.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_step as ts  # noqa: E402  (the shapes, the checkpoints, the seeds' model, the harness)

SYSTEMS = ["trl", "unsloth", "qlora", "qlora-eager", "qlora-padded", "qlora-whole", "qlora-nockpt"]


# ----------------------------------------------------------------------------- data

def make_pairs(args, n_steps: int, vocab: int) -> list[list[dict]]:
    """`n_steps` micro-batches of `args.pairs` pairs, the same for every system (ids from
    [4, data_vocab), as train_step.batches draws them)."""
    import torch

    g = torch.Generator().manual_seed(args.seed * 1_000_003 + args.prompt + args.completion)

    def ids(n):
        return torch.randint(4, min(args.data_vocab, vocab), (n,), generator=g).tolist()

    def length():
        if not args.ragged:
            return args.completion
        return int(torch.randint(max(args.completion // 4, 1), args.completion + 1, (1,),
                                 generator=g))

    if args.method == "kto":  # unpaired: desirable, undesirable, desirable, ...
        return [[{"prompt": ids(args.prompt), "completion": ids(length()), "label": k % 2 == 0}
                 for k in range(args.pairs)] for _ in range(n_steps)]
    return [[{"prompt": ids(args.prompt), "chosen": ids(length()), "rejected": ids(length())}
             for _ in range(args.pairs)] for _ in range(n_steps)]


def real_tokens(pairs: list[dict]) -> int:
    """Both sequences of each example: a pair's chosen and rejected, a KTO example's own and its
    KL sequence (its prompt with the previous example's completion: on average as long)."""
    return sum(2 * (len(p["prompt"]) + len(p["completion"])) if "label" in p
               else 2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in pairs)


# ----------------------------------------------------------------------------- systems
# Each setup returns an object with forward_backward(pairs) -> loss, optimizer_step() and params.

class TrlStep:
    """TRL's trainer's (DPOTrainer's, ORPOTrainer's or KTOTrainer's) own training_step on its
    collator's batch of `rows(pairs)`, the rows of our ids its tokenized dataset would hold."""

    def __init__(self, trainer, args, rows):
        import torch

        self.trainer, self.model, self.rows = trainer, trainer.model, rows
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = ts._optimizer(self.params, args)
        self.max_grad_norm, self.torch, self.device = args.max_grad_norm, torch, args.device
        # what Trainer.train() sets before its steps: one micro-batch a step
        trainer.current_gradient_accumulation_steps = 1

    def forward_backward(self, pairs: list[dict]):
        inputs = self.trainer.data_collator(self.rows(pairs))
        # Trainer.train() runs the model under accelerate's bf16 autocast (bf16=True); the same here
        with self.torch.autocast(self.device, dtype=self.torch.bfloat16,
                                 enabled=self.device == "cuda"):
            return self.trainer.training_step(self.model, inputs)

    def optimizer_step(self):
        self.torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def dpo_rows(trainer):
    """DPOTrainer's rows: each pair's three parts' ids, under the names its tokenized dataset
    uses (prompt_ids in TRL 1.16, prompt_input_ids in older releases)."""
    sample = trainer.train_dataset[0]
    names = {part: next(k for k in sample if k.startswith(part) and k.endswith("ids"))
             for part in ("prompt", "chosen", "rejected")}
    return lambda pairs: [{names[k]: pair[k] for k in names} for pair in pairs]


def orpo_rows(trainer):
    """ORPOTrainer's rows (its tokenize_row's keys): each completion's whole sequence (prompt +
    completion), its attention mask and its labels with the prompt at -100; the prompt's ids and
    mask. No BOS or EOS is added: the ids are the same tokens every system gets. (Its keys are
    fixed: `trainer` is taken only as dpo_rows takes it.)"""
    def row(pair):
        prompt = pair["prompt"]
        out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for part in ("chosen", "rejected"):
            ids = prompt + pair[part]
            out[f"{part}_input_ids"] = ids
            out[f"{part}_attention_mask"] = [1] * len(ids)
            out[f"{part}_labels"] = [-100] * len(prompt) + pair[part]
        return out

    return lambda pairs: [row(pair) for pair in pairs]


def kto_rows(trainer):
    """KTOTrainer's rows, as its _prepare_dataset leaves them: prompt_ids, completion_ids, label,
    and KL_completion_ids, the completions rotated by one within the batch (example i gets
    example i - 1's, the first the last's), which its dataset map does over each
    per_device_train_batch_size rows and the harness over each step's examples (the same
    rows: one micro-batch a step, in order). No EOS is added (TRL's text path appends one to each
    completion): the ids are the same tokens every system gets. (Its keys are fixed: `trainer`
    is taken only as dpo_rows takes it.)"""
    def rows(examples):
        completions = [e["completion"] for e in examples]
        kl = completions[-1:] + completions[:-1]
        return [{"prompt_ids": e["prompt"], "completion_ids": c, "KL_completion_ids": k,
                 "label": e["label"]} for e, c, k in zip(examples, completions, kl)]

    return rows


def _trl_classes(method: str):
    """(config class, trainer class, rows) of TRL for `method`. ORPO sits in trl.experimental
    in TRL 1.16 (and at the top of older releases): whichever this TRL has."""
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOConfig, DPOTrainer, dpo_rows
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOConfig, KTOTrainer, kto_rows
    try:
        from trl import ORPOConfig, ORPOTrainer
    except ImportError:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    return ORPOConfig, ORPOTrainer, orpo_rows


def _method_config(args) -> tuple[dict, list[dict]]:
    """The config arguments of `args.method`'s trainer beyond the shared ones, and the stand-in
    dataset its constructor wants (its rows are never stepped: TrlStep collates ours)."""
    if args.method == "kto":
        # KTO's loss with its in-batch KL estimate (loss_type "kto": not apo_zero_unpaired, which
        # has none), both weights 1 (the data alternate labels), the reference computed in the
        # step (adapters off), not precomputed; no truncation (max_length None: KTOConfig's
        # default 1024 would cut a KL sequence of a longer shape)
        return (dict(loss_type="kto", desirable_weight=1.0, undesirable_weight=1.0,
                     precompute_ref_log_probs=False, max_length=None),
                # two rows, one of each label: its KL map pairs them, its balance check is quiet
                [{"prompt": "a", "completion": "b", "label": True},
                 {"prompt": "a", "completion": "c", "label": False}])
    # DPO: no truncation; ORPO wants a number (it only truncates the stand-in row: our rows skip
    # its tokenize_row)
    max_length = None if args.method == "dpo" else args.prompt + args.completion
    return dict(max_length=max_length), [{"prompt": "a", "chosen": "b", "rejected": "c"}]


def _trl_step(model, tokenizer, args, peft_config=None) -> TrlStep:
    """TRL's trainer of `args.method` on `model` (with `peft_config`, the trainer puts the adapter
    on), bf16 on CUDA, non-reentrant checkpointing, dropout left on; beta is DPO's or KTO's beta
    or ORPO's lambda (TRL calls all three beta)."""
    from datasets import Dataset

    config_class, trainer_class, rows = _trl_classes(args.method)
    cuda = args.device == "cuda"
    method_kwargs, stand_in = _method_config(args)
    config = config_class(
        output_dir=tempfile.mkdtemp(prefix=f"{args.method}-"),
        per_device_train_batch_size=args.pairs, beta=args.beta, learning_rate=args.lr,
        max_grad_norm=args.max_grad_norm, bf16=cuda, use_cpu=not cuda, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, disable_dropout=False,
        report_to=[], seed=args.seed, **method_kwargs)
    trainer = trainer_class(model=model, args=config, train_dataset=Dataset.from_list(stand_in),
                            processing_class=tokenizer, peft_config=peft_config)
    return TrlStep(trainer, args, rows(trainer))


def setup_trl(model_dir: str, args):
    from transformers import AutoTokenizer

    # the seeds' model (train_step.setup_hf) before get_peft_model: the trainer wraps it
    model, _, _, _ = ts.setup_hf(model_dir, args, peft=False)
    return _trl_step(model, AutoTokenizer.from_pretrained(model_dir), args,
                     peft_config=ts._lora_config(args))


def setup_unsloth(model_dir: str, args):
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import unsloth  # noqa: F401  (before transformers and trl, to patch them)
    from unsloth import PatchDPOTrainer, PatchKTOTrainer

    # Unsloth's DPO and ORPO notebooks call PatchDPOTrainer before building TRL's trainer; KTO
    # takes its counterpart, PatchKTOTrainer (both no-ops in this Unsloth: importing unsloth is
    # what rewrites TRL's trainers, KTOTrainer among them)
    (PatchKTOTrainer if args.method == "kto" else PatchDPOTrainer)()
    model, _, _, _ = ts.setup_unsloth(model_dir, args)
    from transformers import AutoTokenizer

    return _trl_step(model, AutoTokenizer.from_pretrained(model_dir), args)


class QloraStep:
    """A DPO, ORPO or KTO micro-batch as qlora train's Stepper runs it (train/step.py): seeded
    dropout, the method's batch loss (ORPO: no reference forward, its USES_REFERENCE is False)
    through
    its CUDA graph where `graphs` and train/graphs.py allow, else eagerly (batch_loss), the loss
    a mean over the pairs; then clip, step, zeroed gradients."""

    def __init__(self, model, applied, args, packed: bool, graphs: bool,
                 share_prompt: bool = True, pairs_per_forward: int | None = None):
        import torch

        from qlora.methods import PREFERENCE_METHODS
        from qlora.methods.preference import PreferenceOptions
        from qlora.train.graphs import GraphedSteps, unsupported_reason
        from qlora.train.optim import build_optimizer

        self.model, self.args, self.packed, self.torch = model, args, packed, torch
        self.share_prompt = share_prompt
        self.pairs_per_forward = pairs_per_forward or args.pairs  # the micro-batch
        self.grad_norms = []  # each step's, before clipping (tensors: read after the timed steps)
        self.seed, self.stride, self.index = applied.dropout_seed, applied.dropout_stride, 0
        name = "paged_adamw_8bit" if args.device == "cuda" else "adamw_torch"
        self.opt = build_optimizer(model, name, args.lr, 0.001, (0.9, 0.999), 1e-8)
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        self.opts = PreferenceOptions(beta=args.beta)
        self.method = PREFERENCE_METHODS[args.method]
        # as qlora train decides it (train/fast_paths.graphed_steps): rows up to the longest sequence
        longest = args.prompt + args.completion
        self.no_graphs_reason = (unsupported_reason(model, torch.device(args.device), longest)
                                 if graphs else "off (qlora-eager)")
        self.graphs = (GraphedSteps(model, [p.grad for p in self.params],
                                    preference=(self.method, self.opts))
                       if self.no_graphs_reason is None else None)

    def forward_backward(self, pairs: list[dict]):
        """A step's pairs, a micro-batch (`pairs_per_forward` of them) at a time, their gradients
        summed: the mean loss over all of the step's pairs."""
        n = self.pairs_per_forward
        return sum(self.micro_batch(pairs[i:i + n], 1.0 / len(pairs))
                   for i in range(0, len(pairs), n)) / len(pairs)

    def micro_batch(self, pairs: list[dict], scale: float):
        """The loop's micro-batch: staged on the host (GraphedSteps.stage_preference) and replayed,
        or batch_loss eagerly; its loss sum's gradient times `scale` added to the adapters'. The
        loop stages a step's micro-batches during the step before; the harness syncs around the
        step, so here the staging is timed as part of it."""
        from qlora.adapters import set_dropout_seed
        from qlora.data.preference import preference_batch
        from qlora.methods.preference import batch_loss

        batch = preference_batch(pairs, 0, packed=self.packed, share_prompt=self.share_prompt)
        staged = self.graphs.stage_preference(batch) if self.graphs is not None else None
        if self.seed is not None:
            set_dropout_seed(self.seed, self.args.seed, self.index, self.stride)
        self.index += 1
        if self.graphs is not None:  # (a copy: the graph's next replay writes its output again)
            return self.graphs.run(staged, scale).clone()
        loss_sum, _ = batch_loss(self.method, self.model, batch, self.opts)
        (loss_sum * scale).backward()
        return loss_sum.detach()

    def optimizer_step(self):
        from qlora.train.optim import zero_grads

        self.grad_norms.append(self.torch.nn.utils.clip_grad_norm_(self.params, self.args.max_grad_norm))
        self.opt.step()
        zero_grads(self.opt)


def setup_qlora(model_dir: str, args, padded: bool, graphs: bool = True,
                share_prompt: bool = True, checkpointing: bool = True):
    import torch

    from qlora.adapters import AdapterConfig, attach_adapters
    from qlora.methods.preference import packs_with_varlen
    from qlora.models import load_model
    from qlora.quant import QuantConfig
    from qlora.speed import SpeedPlan, apply_speed

    fast = args.device == "cuda"
    # the CPU (the test) takes the base TRL's trainer has there: unquantized fp32 (setup_hf gives
    # no bitsandbytes config on the CPU, and prepare_model_for_kbit_training upcasts to fp32)
    quant = (QuantConfig(method="nf4", double_quant=True, compute_dtype=torch.bfloat16) if fast
             else QuantConfig(method="none", compute_dtype=torch.float32))
    model = load_model(model_dir, quant, device=args.device)
    torch.manual_seed(args.seed)
    attach_adapters(model, AdapterConfig(r=args.lora_r, alpha=args.lora_alpha,
                                         dropout=args.lora_dropout, target_modules=list(ts.SEVEN)))
    model.gradient_checkpointing = checkpointing
    model.train()
    # train_step.py's `qlora` plan (cuda_graphs: the Stepper's runner, made in QloraStep)
    plan = SpeedPlan(fused_kernels=True, fast_base=fast, grouped=fast,
                     keep_attention=args.keep_attention and checkpointing,
                     keep_activations=args.keep_activations if checkpointing else False,
                     seeded_dropout=True,
                     embedding_on_host=fast, cuda_graphs=graphs)
    applied = apply_speed(model, plan)
    packed = not padded and packs_with_varlen(model, torch.device(args.device))
    return QloraStep(model, applied, args, packed, graphs, share_prompt,
                     pairs_per_forward=None if checkpointing else 1)


def setup_system(system: str, model_dir: str, args):
    if system == "trl":
        return setup_trl(model_dir, args)
    if system == "unsloth":
        return setup_unsloth(model_dir, args)
    if system == "qlora-nockpt" and args.method == "kto":
        raise ValueError("qlora-nockpt: pair methods only (KTO's KL estimate borrows completions "
                         "within its micro-batch, so one example a forward is another loss)")
    if system in ("qlora", "qlora-eager", "qlora-padded", "qlora-whole", "qlora-nockpt"):
        return setup_qlora(model_dir, args, padded=system == "qlora-padded",
                           graphs=system != "qlora-eager", share_prompt=system != "qlora-whole",
                           checkpointing=system != "qlora-nockpt")
    raise ValueError(system)


# ----------------------------------------------------------------------------- worker

def worker(args) -> int:
    import torch

    cuda = args.device == "cuda"
    shape = ts.SHAPES[args.shape]
    rec = dict(system=args.system, shape=args.shape, pairs=args.pairs, prompt=args.prompt,
               completion=args.completion, ragged=args.ragged, steps=args.steps,
               warmup=args.warmup, method=args.method, beta=args.beta)
    try:
        t0 = time.time()
        step = setup_system(args.system, args.model_dir, args)
        rec["load_s"] = round(time.time() - t0, 1)
        rec["trainable_params"] = sum(p.numel() for p in step.params)
        if isinstance(step, QloraStep):
            rec["layout"] = ("packed" + (", each prompt once" if step.share_prompt else "")
                             if step.packed else "padded")
            rec["cuda_graphs"] = "on" if step.graphs is not None else step.no_graphs_reason
        data = make_pairs(args, args.steps, shape["vocab_size"])
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        for k, pairs in enumerate(data):
            sync()
            t = time.perf_counter()
            loss = step.forward_backward(pairs)
            step.optimizer_step()
            sync()
            times.append(time.perf_counter() - t)
            losses.append(float(loss))
        timed = times[args.warmup:] or times
        med = statistics.median(timed)
        tokens = statistics.mean(real_tokens(p) for p in data[args.warmup:] or data)
        rec.update(tokens_per_step=tokens, step_s_median=round(med, 5), step_s_min=round(min(timed), 5),
                   examples_per_s=round(args.pairs / med, 3), tokens_per_s=round(tokens / med, 1),
                   peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3)
                   if cuda else None,
                   peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3)
                   if cuda else None,
                   loss_first=round(losses[0], 5), loss_last=round(losses[-1], 5),
                   losses=[round(x, 5) for x in losses], step_times=[round(x, 4) for x in times])
        if isinstance(step, QloraStep):
            rec["grad_norms"] = [round(float(n), 6) for n in step.grad_norms]
        graphs = getattr(step, "graphs", None)
        if graphs is not None:  # how many shapes were captured, and a capture that failed
            rec.update(graphs_captured=len(graphs.graphs), graphs_failed=graphs.failed)
    except Exception as e:  # noqa: BLE001 — a failed system is a result, not a crash
        oom = isinstance(e, torch.OutOfMemoryError)
        rec["error"] = ("OOM: " if oom else "") + f"{type(e).__name__}: {e}"[:1500]
        if not oom:
            rec["traceback"] = traceback.format_exc()[-3000:]
    ts.emit(Path(args.results), rec)
    return 0


# ----------------------------------------------------------------------------- parent

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama-3-8b,qwen2.5-1.5b")
    ap.add_argument("--systems", default="qlora,trl,unsloth")
    ap.add_argument("--pairs", type=int, default=4, help="pairs per step (one micro-batch)")
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    ap.add_argument("--completion", type=int, default=512, help="tokens of each completion")
    ap.add_argument("--ragged", action="store_true",
                    help="completion lengths drawn from [completion/4, completion]")
    ap.add_argument("--steps", type=int, default=8, help="steps per system, warm-up included")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps at the start")
    ap.add_argument("--method", default="dpo", choices=("dpo", "orpo", "kto"),
                    help="the preference loss: DPO (a reference forward), ORPO (none) or KTO "
                         "(unpaired examples, their KL sequences)")
    ap.add_argument("--beta", type=float, default=0.1, help="DPO's and KTO's beta; ORPO's lambda")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=int, default=32)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-grad-norm", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-vocab", type=int, default=1024, help="token ids are drawn from [4, data_vocab)")
    ap.add_argument("--hf-attn", default="sdpa", help="attn_implementation for trl")
    ap.add_argument("--keep-attention", type=ts._keep_attention, default=True,
                    help="layers whose attention qlora keeps for backward: all or the last N")
    ap.add_argument("--keep-activations", type=int, default=0,
                    help="qlora with checkpointing: the last N layers not checkpointed (every "
                         "activation kept, no rerun; qlora train's keep_activations)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="benchmarks/results/dpo")
    ap.add_argument("--model-root", default=None, help="where the random checkpoints go (default: a tmp dir)")
    ap.add_argument("--worker-timeout", type=float, default=600)
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds for the whole run; later work skipped")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--system", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--results", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.seqs = [args.prompt + args.completion]  # what train_step's Unsloth loader sizes itself by
    return args


def _child_argv(args, **kw) -> list[str]:
    keep = ["pairs", "prompt", "completion", "steps", "warmup", "method", "beta", "lora_r", "lora_alpha",
            "lora_dropout", "lr", "max_grad_norm", "seed", "data_vocab", "hf_attn", "device",
            "keep_activations"]
    return ts.worker_argv(__file__, args, keep, **kw) + (["--ragged"] if args.ragged else [])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    run = ts.Run.start(args)
    results = run.results

    def error(system, shape, msg):
        ts.emit(results, dict(system=system, shape=shape, pairs=args.pairs, prompt=args.prompt,
                              completion=args.completion, ragged=args.ragged, method=args.method,
                              error=msg))

    for shape in args.shapes.split(","):
        model_dir = run.model_root / shape
        if not (model_dir / "config.json").exists():
            rc, tail = run.make_model(shape, model_dir)
            if rc != 0:
                for system in args.systems.split(","):
                    error(system, shape, f"could not build the random checkpoint: rc={rc}\n{tail[-1500:]}")
                continue
        for system in args.systems.split(","):
            if run.left() < 20:
                error(system, shape, "skipped: the run's --deadline was reached")
                continue
            before = len(ts.read_records(results))
            rc, tail = run.child(
                _child_argv(args, worker=True, system=system, shape=shape, model_dir=model_dir,
                            results=results),
                args.worker_timeout)
            if len(ts.read_records(results)) == before:  # the worker died before writing its record
                why = "timed out" if rc is None else f"worker exited with rc={rc}"
                error(system, shape, f"{why}\n{ts._last_error(tail)}")
        run.drop_model(model_dir)
    run.finish()
    print_table(results)
    print(f"total {time.time() - run.started:.0f}s", flush=True)
    return 0


def print_table(results: Path) -> None:
    recs = ts.read_records(results)
    if not recs:
        return
    print(f"\n{'system':13} {'shape':13} {'layout':7} {'step s':>8} {'pairs/s':>8} {'tok/s':>8} "
          f"{'alloc':>6} {'resv':>6} {'loss0':>7} {'lossN':>7}")
    for r in recs:
        head = f"{r['system']:13} {r['shape']:13} {r.get('layout', ''):7}"
        if "error" in r:
            print(head, "ERROR", r["error"].splitlines()[0][:100])
        else:
            print(head, f"{r['step_s_median']:8.3f} {r['examples_per_s']:8.2f} {r['tokens_per_s']:8.0f} "
                        f"{r['peak_alloc_gib'] or 0:6.2f} {r['peak_reserved_gib'] or 0:6.2f} "
                        f"{r['loss_first']:7.4f} {r['loss_last']:7.4f}")


if __name__ == "__main__":
    sys.exit(main())
