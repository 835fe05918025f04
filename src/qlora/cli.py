"""The `qlora` command: train · eval · generate · chat · merge · export · plan · compare · demo.

Each sub-command parses its options here and calls one function of the module that does the job.
`qlora --help` and `qlora --version` import nothing heavy: the options of a sub-command that need
qlora.config, qlora.quant or qlora.compare (which import torch) are added only when that
sub-command is parsed or asked for help, and each command imports what it runs.
"""

from __future__ import annotations

import argparse
import sys

from qlora import __version__
from qlora.errors import QloraError


class _Command(argparse.ArgumentParser):
    """A sub-command's parser. `fill`, when set, adds its options on first need (parsing, help).
    A negative number after an option that takes a value is that option's value: argparse alone
    reads `--learning_rate -1e-3` (or -inf) as an option with no value ("expected one argument")."""

    fill = None

    def filled(self) -> _Command:
        fill, self.fill = self.fill, None
        if fill is not None:
            fill(self)
        return self

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super(_Command, self.filled()).parse_known_args(self._numbers_joined(args),
                                                               namespace)

    def format_usage(self):
        return super(_Command, self.filled()).format_usage()

    def format_help(self):
        return super(_Command, self.filled()).format_help()

    def _numbers_joined(self, args: list[str]) -> list[str]:
        """`--key -1e-3` as `--key=-1e-3` (before a bare `--` only; not after a flag)."""
        out: list[str] = []
        for arg in args:
            prev = out[-1] if out else ""
            action = self._option_string_actions.get(prev)
            if ("--" not in out and prev.startswith("--") and len(prev) > 2 and "=" not in prev
                    and arg.startswith("-") and _is_number(arg)
                    and (action is None or action.nargs != 0)):
                out[-1] = f"{prev}={arg}"
            else:
                out.append(arg)
        return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"qlora {__version__}",
                        help="print the package version and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Command,
                                help="`qlora COMMAND --help` lists a command's options")
    add_demo(sub)
    add_train(sub)
    add_generate(sub)
    add_chat(sub)
    add_eval(sub)
    add_merge(sub)
    add_export(sub)
    add_plan(sub)
    add_compare(sub)
    return parser


# --- demo ---------------------------------------------------------------------------------------
def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train a tiny model on a bundled task, end to end, on the CPU")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo); a "
                   "folder a previous demo wrote is replaced, any other non-empty one refused. "
                   "The base model and data go beside it, in .NAME-inputs")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 300: held-out "
                   "accuracy 0%% -> 100%%, about a minute on 2 CPU cores)")
    p.set_defaults(func=run_demo)


def run_demo(args) -> None:
    from qlora.demo import DEFAULT_STEPS, run

    run(out_dir=args.out, max_steps=args.steps or DEFAULT_STEPS)


# --- train --------------------------------------------------------------------------------------
class _TrainParser(_Command):
    """Leaves unknown `--key value` pairs to the run config, which refuses them naming the
    closest option (argparse would only say "unrecognized arguments")."""

    def parse_known_args(self, args=None, namespace=None):
        ns, extra = super().parse_known_args(args, namespace)
        ns.unknown_options = extra
        return ns, []


def add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="fine-tune adapters on a data file", allow_abbrev=False,
        description="Fine-tune LoRA / rsLoRA / DoRA adapters over a 4-bit base. Options come from "
        "the defaults (the QLoRA recipe), then --config FILE (YAML), then --key value here.")
    p.__class__ = _TrainParser
    p.fill = _train_options
    p.set_defaults(func=run_train)


def _train_options(p) -> None:
    import dataclasses

    from qlora.config import ALIASES, CHOICES, HELP, NONE_MEANS, RunConfig

    p.epilog = ("Aliases: " + ", ".join(f"--{a} = --{k}" for a, k in ALIASES.items())
                + "; --bf16 / --fp16 set --dtype. Example: qlora train --model "
                "models/Qwen2.5-1.5B-Instruct --data alpaca.jsonl --config "
                "examples/notebook-qwen2.5-1.5b-alpaca.yaml --max_steps 100")
    p.add_argument("--config", metavar="FILE", help="a YAML file holding a whole run")
    for f in dataclasses.fields(RunConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f"one of {', '.join(CHOICES[f.name])}; " if f.name in CHOICES else ""
        kind = getattr(f.type, "__name__", str(f.type))
        bare = kind == "bool"  # `--packing` alone means true
        p.add_argument(f"--{f.name}", *([f"--{f.name.replace('_', '-')}"] if "_" in f.name else []),
                       dest=f"opt_{f.name}", metavar=kind.upper().replace(" | NONE", ""),
                       nargs="?" if bare else None, const="true" if bare else None,
                       help=f"{HELP[f.name]}; {text}"
                       + (f"default {default}" if default != "" else "required (here or in --config)")
                       + (f" ({NONE_MEANS[f.name]})" if f.name in NONE_MEANS else ""))


def run_train(args) -> None:
    import os

    from qlora.config import load_config, parse_cli_overrides
    from qlora.train import train

    overrides = {k[len("opt_"):]: v for k, v in vars(args).items()
                 if k.startswith("opt_") and v is not None}
    overrides.update(parse_cli_overrides(getattr(args, "unknown_options", [])))
    cfg = load_config(args.config, overrides)
    result = train(cfg)
    out = result.output_dir
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 speaks for the run
        if result.stopped == "interrupted":
            raise SystemExit(128 + (result.signal or 2))
        return
    if result.stopped == "interrupted":
        print(f"stopped by signal {result.signal}; checkpoint {result.checkpoint}. Continue with: "
              f"qlora train --config {out}/run_config.yaml --resume latest", file=sys.stderr)
        raise SystemExit(128 + (result.signal or 2))
    s = result.summary
    best = "" if s.get("best_eval_loss") is None else (
        f", best eval loss {s['best_eval_loss']:.4f} at step {s['best_step']}")
    print(f"done: {s['global_step']} steps in {s['wall_time_s']:.0f} s ({result.stopped}{best}); "
          f"adapter, tokenizer, config, metrics, loss.png and summary.json in {out}")


# --- generate -----------------------------------------------------------------------------------
def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with base (+ adapter)",
                       description="Answer prompts with the model (and adapter), streaming the text. "
                                   "Prompts are rendered as the adapter was trained (its run's "
                                   "prompt_format.json: chat template, alpaca prompt or plain text); "
                                   "otherwise with the model's chat template when it has one.")
    p.fill = _generate_options
    p.set_defaults(func=run_generate)


def _generate_options(p) -> None:
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt(s) to answer")
    p.add_argument("--prompts-file", help="prompts, one per line, or JSONL with a \"prompt\" field")
    _add_model_args(p)
    p.add_argument("--no-chat-template", action="store_true",
                   help="feed the prompt as plain text, whatever the adapter was trained with")
    p.add_argument("--chat-template", help="template to use instead of the tokenizer's (or the "
                                           "one the adapter was trained with): 'chatml', a .jinja "
                                           "file or a template string")
    p.add_argument("--system", help="system prompt (with a chat template)")
    _add_sampling_args(p)


def _add_model_args(p) -> None:
    from qlora.quant import QUANT_METHODS

    p.add_argument("--model", required=True, help="base model directory (Hugging Face layout)")
    p.add_argument("--adapter", help="adapter directory (PEFT format)")
    p.add_argument("--quant", default="nf4", choices=QUANT_METHODS,
                   help="how to hold the base weights (default nf4, as QLoRA trains)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU) | cuda | cpu")
    p.add_argument("--ignore-base-name", action="store_true",
                   help="use the adapter even if its base_model_name_or_path names another model")


def _add_sampling_args(p, max_new_tokens: int = 256) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"longest answer in tokens (default {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0 = off)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (default 0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="default 1.0 = off")
    p.add_argument("--seed", type=int, help="sampling seed, for repeatable samples")


def _load_for_generation(args):
    """(model, tokenizer, PromptRendering, options) from the shared generate/chat arguments; the
    rendering chosen is said in one line."""
    from qlora.chat import prompt_rendering, stop_token_ids
    from qlora.infer import GenerationOptions, load_for_inference
    from qlora.train.output import read_prompt_format

    record, record_path = read_prompt_format(args.adapter) or (None, None)
    model, tokenizer = load_for_inference(args.model, args.adapter, quant=args.quant,
                                          device=args.device,
                                          ignore_base_name=args.ignore_base_name)
    rendering = prompt_rendering(tokenizer, record, record_path,
                                 not getattr(args, "no_chat_template", False), args.chat_template)
    print(f"prompt rendering: {rendering.why}", file=sys.stderr)
    opts = GenerationOptions(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
        eos_token_ids=stop_token_ids(tokenizer, args.model, rendering.template))
    return model, tokenizer, rendering, opts


def run_generate(args) -> None:
    from qlora.chat import generate_all, read_prompts_file

    if args.prompts and args.prompts_file:
        raise QloraError("give prompts as arguments or with --prompts-file, not both")
    prompts = read_prompts_file(args.prompts_file) if args.prompts_file else list(args.prompts)
    if not prompts:
        raise QloraError("no prompt given: pass PROMPT arguments or --prompts-file FILE")
    model, tokenizer, rendering, opts = _load_for_generation(args)
    if args.system and rendering.alpaca:
        print("note: --system is left out: the alpaca prompt the adapter was trained with has no "
              "place for it (pass --chat-template to use one)", file=sys.stderr)
    elif args.system and rendering.template is None:
        print("note: --system without a chat template is put before the prompt as plain text",
              file=sys.stderr)
    generate_all(model, tokenizer, prompts, rendering.template, args.system, opts,
                 model.spec.max_position_embeddings, alpaca=rendering.alpaca)


# --- chat ---------------------------------------------------------------------------------------
def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="interactive multi-turn chat with base (+ adapter)",
                       description="Chat in the terminal: one message per line; /reset clears the "
                                   "conversation, /exit or Ctrl-D leaves.")
    p.fill = _chat_options
    p.set_defaults(func=run_chat)


def _chat_options(p) -> None:
    _add_model_args(p)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--chat-template", help="template to use instead of the tokenizer's (or the "
                                           "one the adapter was trained with): 'chatml', a .jinja "
                                           "file or a template string")
    _add_sampling_args(p)


def run_chat(args) -> None:
    from qlora.chat import ChatSession, run_chat as chat_loop

    model, tokenizer, rendering, opts = _load_for_generation(args)
    if rendering.alpaca:
        print("note: each message is answered on its own, as an alpaca instruction: the adapter "
              "was trained on single instructions, not conversations", file=sys.stderr)
    session = ChatSession(model, tokenizer, rendering.template, opts, system=args.system,
                          context=model.spec.max_position_embeddings, alpaca=rendering.alpaca)
    chat_loop(session)


# --- eval ---------------------------------------------------------------------------------------
def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and generation metrics on a data file",
                       description="Perplexity on the tokens training puts loss on; for instruction "
                                   "data also exact match, ROUGE-L and BLEU of greedy answers.")
    p.fill = _eval_options
    p.set_defaults(func=run_eval)


def _eval_options(p) -> None:
    _add_model_args(p)
    p.add_argument("--data", required=True, help="data file (jsonl/json/csv/parquet)")
    p.add_argument("--max-samples", type=int, help="evaluate the first N examples only")
    p.add_argument("--report", help="write all numbers and settings to this new JSON file "
                                    "(an existing file is refused, not overwritten)")
    p.add_argument("--compare-base", action="store_true",
                   help="with --adapter: also evaluate the base alone, side by side")
    p.add_argument("--max-len", type=int,
                   help="tokens per packed row; longer examples are cut (default: the model's "
                        "context, at most 2048)")
    p.add_argument("--batch-size", type=int, default=4, help="packed rows per forward pass (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="longest generated answer (default 128)")
    p.add_argument("--no-generate", action="store_true", help="perplexity only")
    p.add_argument("--chat-template", help="template for chat data instead of the tokenizer's")


def run_eval(args) -> None:
    from qlora.eval import run_eval as evaluate

    evaluate(args.model, args.data, args.adapter, compare_base=args.compare_base, quant=args.quant,
             device=args.device, max_samples=args.max_samples, max_len=args.max_len,
             micro_batch=args.batch_size, generate=not args.no_generate,
             max_new_tokens=args.max_new_tokens, chat_template=args.chat_template,
             report_path=args.report, ignore_base_name=args.ignore_base_name)


# --- merge --------------------------------------------------------------------------------------
def add_merge(sub) -> None:
    p = sub.add_parser("merge", help="fold an adapter into a 16-bit Hugging Face checkpoint",
                       description="Fold an adapter into its base and write a Hugging Face checkpoint; "
                                   "then (unless --no-check) load it back and compare it with base + "
                                   "adapter on held-out tokens (OUT.check.json beside it).")
    p.add_argument("--model", required=True, help="base model directory (Hugging Face layout)")
    p.add_argument("--adapter", required=True, help="adapter directory (PEFT format)")
    p.add_argument("--out", required=True, help="new output directory (must not exist)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="dtype of the merged weights (default bf16)")
    p.add_argument("--base", default="original", choices=["original", "nf4"],
                   help="fold into the 16-bit original weights (default) or into their NF4 round "
                        "trip, the weights QLoRA training saw (see docs/MERGE_AND_EXPORT.md)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--ignore-base-name", action="store_true",
                   help="merge even if the adapter's base_model_name_or_path names another model")
    _add_check_args(p, default_on="on", device_runs="base + adapter run for the check")
    p.set_defaults(func=run_merge)


def _add_check_args(p, default_on: str, device_runs: str) -> None:
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                   help=f"compare the output with base + adapter on held-out tokens (default: {default_on})")
    p.add_argument("--check-data", metavar="FILE",
                   help="data to compare on (default: the training run's validation data, read from "
                        "run_config.yaml beside the adapter, else a built-in text)")
    p.add_argument("--check-samples", type=int, default=8, metavar="N",
                   help="examples to compare on (default 8)")
    p.add_argument("--device", default="auto",
                   help=f"where {device_runs}: auto | cpu | cuda (default auto: the GPU where "
                        "there is one)")


def run_merge(args) -> None:
    from pathlib import Path

    from qlora.export.check import ReferenceUnavailable, check_fits_host, check_merge, report_path
    from qlora.files import check_readable
    from qlora.merge import merge_adapter
    from qlora.models.weights import read_headers

    report = report_path(Path(args.out))
    if args.check is not False and report.exists():
        raise QloraError(f"{report} exists; give a new --out (or --no-check)")
    if args.check is not False and args.check_data is not None:
        check_readable(args.check_data, "--check-data")  # read after the merge is written
    if not Path(args.model).is_dir():
        raise QloraError(f"--model {args.model}: no such directory")
    headers = read_headers(args.model)  # once: the host check and the merge take them from here
    check = args.check is not False and check_fits_host(
        args.check, headers, args.base, args.device, lambda line: print(line, file=sys.stderr),
        args.adapter, args.check_samples)
    out = merge_adapter(args.model, args.adapter, args.out, dtype=args.dtype, base=args.base,
                        max_shard_size=args.max_shard_size, ignore_base_name=args.ignore_base_name,
                        headers=headers, log=print)
    print(f"merged checkpoint written to {out}")
    if check:
        try:
            check_merge(out, args.model, args.adapter, args.dtype, args.base, args.check_data,
                        args.check_samples, args.device, headers=headers)
        except ReferenceUnavailable as err:
            if args.check:
                raise
            print(f"note: check skipped: {err}", file=sys.stderr)


# --- export -------------------------------------------------------------------------------------
def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a GGUF file for llama.cpp (and an Ollama Modelfile)",
                       description="Write a GGUF file; optionally steer the k-quants with an importance "
                                   "matrix from your data, write an Ollama Modelfile beside it, and check "
                                   "the file in llama.cpp against base + adapter (docs/MERGE_AND_EXPORT.md).")
    p.fill = _export_options
    p.set_defaults(func=run_export)


def _export_options(p) -> None:
    from qlora.export.mixtures import FILE_TYPES

    p.add_argument("--gguf", action="store_true",
                   help="write GGUF: the one format, so this may be left out")
    p.add_argument("--model", required=True, help="model directory (Hugging Face layout)")
    p.add_argument("--adapter", help="adapter directory (PEFT format), folded into each tensor "
                   "as it is read (no merged copy on disk)")
    p.add_argument("--out", required=True, help="new .gguf file (must not exist)")
    p.add_argument("--type", default="f16", choices=list(FILE_TYPES),
                   help="file type: 16-bit, q8_0, q4_0, or a k-quant mixture as llama.cpp's "
                        "(default f16)")
    p.add_argument("--base", default="original", choices=["original", "nf4"],
                   help="with --adapter: merge base, as for `qlora merge`")
    p.add_argument("--ignore-base-name", action="store_true",
                   help="with --adapter: merge even if the adapter names another base model")
    p.add_argument("--imatrix-data", metavar="FILE",
                   help="your data (e.g. the training file): its activations weigh the k-quants' "
                        "rounding errors, as llama.cpp's importance matrix")
    p.add_argument("--imatrix-samples", type=int, default=128, metavar="N",
                   help="examples of --imatrix-data to run (default 128)")
    p.add_argument("--ollama", action="store_true",
                   help="also write OUT.Modelfile for Ollama (prompt template, stop tokens, sampling); "
                        "with --adapter, prompts as the adapter was trained (its run's "
                        "prompt_format.json: chat template, alpaca prompt or plain text)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU processes quantizing the tensors where they run on the CPU (default: "
                        "one per core; 1: none, in the exporting process)")
    _add_check_args(p, default_on="on where llama-cpp-python is importable",
                    device_runs="base + adapter run (check, importance matrix) and the tensors "
                                "are quantized")
    p.add_argument("--check-engine", default="llama.cpp", choices=["llama.cpp", "qlora"],
                   help="run the file in llama.cpp (default), or its dequantized weights in qlora's "
                        "own engine (no llama.cpp needed)")
    p.add_argument("--llama-python", metavar="PATH",
                   help="a python that can import llama_cpp, when this one cannot "
                        "(default: $QLORA_LLAMA_PYTHON)")


def run_export(args) -> None:
    from qlora.export.gguf import describe
    from qlora.export.pipeline import export_model

    outputs = export_model(args.model, args.out, qtype=args.type, adapter_dir=args.adapter,
                           merge_base=args.base, ignore_base_name=args.ignore_base_name,
                           imatrix_data=args.imatrix_data, imatrix_samples=args.imatrix_samples,
                           check=args.check, check_data=args.check_data,
                           check_samples=args.check_samples, check_engine=args.check_engine,
                           llama_python=args.llama_python, ollama=args.ollama, device=args.device,
                           threads=args.threads, log=lambda line: print(line, flush=True))
    print(f"GGUF written to {outputs['gguf']}: {describe(outputs['gguf'])}")
    if outputs["modelfile"] is not None:
        print(f"Ollama Modelfile written to {outputs['modelfile']} "
              f"(ollama create NAME -f {outputs['modelfile']})")


# --- plan ---------------------------------------------------------------------------------------
def add_plan(sub) -> None:
    p = sub.add_parser("plan", help="predict peak GPU memory of a run, and whether it fits",
                       description="Predict the peak GPU memory of a training step, part by part, "
                                   "from config.json sizes alone (no GPU, no weights).")
    p.fill = _plan_options
    p.set_defaults(func=run_plan)


def _plan_options(p) -> None:
    from qlora.methods import METHODS
    from qlora.quant import QUANT_METHODS

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory (reads its config.json)")
    src.add_argument("--config-json", help="a config.json file")
    src.add_argument("--shape", help="a named shape, e.g. llama-3-8b, qwen2.5-1.5b, llama-2-70b")
    p.add_argument("--quant", default="nf4", help=" | ".join(QUANT_METHODS) + " (default nf4)")
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize the 4-bit quantization constants too (default on)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--targets", default="all-linear", help="all-linear (default) or e.g. q_proj,v_proj")
    p.add_argument("--dora", action="store_true", help="DoRA adapters")
    p.add_argument("--lora-dropout", type=float, default=0.05,
                   help="adapter dropout: its masks take memory when > 0 (default 0.05)")
    p.add_argument("--adapter-dtype", default="fp32", help="adapter master weights: fp32 | bf16 | fp16 (default fp32)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per row (default 2048)")
    p.add_argument("--micro-batch", type=int, default=1, help="rows per forward pass (default 1)")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="gradient checkpointing: each layer recomputed in backward")
    p.add_argument("--offload-activations", action="store_true",
                   help="checkpointed layer inputs kept in host memory, two layers' on the GPU")
    p.add_argument("--tile-mlp", nargs="?", const=True, default=False, type=_tile_tokens,
                   metavar="N", help="the MLP in sequence tiles (of the model's default size, or "
                        "of N tokens): one tile's intermediates, not the sequence's")
    p.add_argument("--keep-attention", nargs="?", const=True, default=False, type=_layer_count,
                   metavar="N", help="with checkpointing, attention kept for backward instead of "
                        "recomputed, in every layer or in the last N (qlora train's keep_attention; "
                        "by default in as many layers as fit)")
    p.add_argument("--keep-activations", nargs="?", const=True, default=False, type=_layer_count,
                   metavar="N", help="with checkpointing, the last N layers (every layer with no "
                        "N) not checkpointed: every activation kept, no rerun (qlora train's "
                        "keep_activations; by default in as many layers as fit, after attention)")
    p.add_argument("--embedding-on-host", action=argparse.BooleanOptionalAction, default=True,
                   help="the frozen untied input embedding in pinned host memory (qlora train's "
                        "default on a GPU)")
    p.add_argument("--optimizer", default="paged_adamw_8bit",
                   help="paged_adamw_8bit (default) | paged_adamw_32bit | adamw_8bit | adamw_torch")
    p.add_argument("--kernels", default="fused",
                   help="fused (default: Triton RMSNorm/SwiGLU/RoPE, as qlora train runs on a GPU) | eager "
                        "(PyTorch ops)")
    p.add_argument("--loss", default="chunked-fused",
                   help="chunked-fused (default; frozen lm_head: qlora train's) | chunked (chunks recomputed "
                        "in backward: a trainable lm_head) | full (fp32 logits, transformers')")
    p.add_argument("--gpu-memory", help="GPU size, e.g. 24GB (GB = GiB here); default: the detected GPU")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (ranks under torchrun; default 1)")
    p.add_argument("--sharding", default="ddp", help="ddp (default) | fsdp (with --gpus > 1)")
    p.add_argument("--auto-fit", action="store_true", help="also print the largest micro-batch that fits")
    p.add_argument("--method", default="sft", choices=METHODS,
                   help="sft, or a preference method: two sequences per example, and a reference "
                        "forward for dpo / kto; their log-probs come per token from the chunked loss")
    p.add_argument("--precompute-ref-log-probs", action="store_true",
                   help="dpo: the reference log-probs precomputed before training (no reference "
                        "forward in the steps)")
    p.add_argument("--prompt-len", type=int, default=0, metavar="N",
                   help="dpo / orpo / simpo: tokens of each pair's prompt, packed once in front of "
                        "both completions (qlora train's packed pairs); --seq-len stays a whole "
                        "sequence, prompt and completion (default 0: nothing shared, the upper bound)")


def _say_whole_layers(memory, arch, cfg, gpu_bytes: int) -> None:
    """What qlora train's keep_activations would take on this GPU where it is left out."""
    from dataclasses import replace

    n = memory.activation_layers_that_fit(arch, cfg, gpu_bytes)
    if not n or cfg.keep_activations:
        return
    whole = memory.plan(arch, replace(cfg, keep_activations=n))
    which = "any layer" if n == arch.num_layers else f"the last {n} of {arch.num_layers} layers"
    print(f"qlora train does not checkpoint {which} here (keep_activations, faster: no rerun): "
          f"peak allocated ~{whole.allocated / memory.GiB:.2f} GiB; "
          f"--keep-activations{'' if n == arch.num_layers else f' {n}'} shows that plan")


def _tile_tokens(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of tokens per tile (1 or more)")
    return int(text)


def _layer_count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of layers (0 or more)")
    return int(text)


def run_plan(args) -> None:
    from dataclasses import replace

    from qlora import memory

    arch = memory.resolve_arch(args.model, args.config_json, args.shape)
    cfg = memory.PlanConfig(
        quant=args.quant, double_quant=args.double_quant, r=args.r, targets=args.targets, dora=args.dora,
        lora_dropout=args.lora_dropout, adapter_dtype=args.adapter_dtype, seq_len=args.seq_len,
        micro_batch=args.micro_batch, checkpointing=args.checkpointing,
        offload_activations=args.offload_activations, tile_mlp=args.tile_mlp,
        optimizer=args.optimizer, kernels=args.kernels,
        keep_attention=args.keep_attention if args.checkpointing else False,
        keep_activations=args.keep_activations if args.checkpointing else False,
        embedding_on_host=args.embedding_on_host,
        loss=args.loss, gpus=args.gpus, sharding=args.sharding,
        method=args.method, reference_precomputed=args.precompute_ref_log_probs,
        prompt_len=args.prompt_len)
    b = memory.plan(arch, cfg)
    gpu_bytes, gpu_name = _plan_gpu_bytes(args, memory)  # a bad --gpu-memory fails before the table
    generic = isinstance(arch, memory.GenericSpec)
    targets = (memory.generic_targets(arch, cfg.targets) if generic
               else memory.target_names(cfg.targets, arch))
    print(f"{arch.name}: {arch.num_params() / 1e9:.2f}B params · {cfg.quant}"
          f"{' + double quant' if cfg.double_quant and cfg.quant in ('nf4', 'fp4') else ''} · "
          f"{'DoRA' if cfg.dora else 'LoRA'} r={cfg.r} on {len(targets)} {'linear layers' if generic else 'projections'} · "
          f"seq {cfg.seq_len} x micro-batch {cfg.micro_batch} · checkpointing "
          f"{'on' if cfg.checkpointing else 'off'} · {cfg.optimizer} · {cfg.gpus} GPU(s)"
          + (f" {cfg.sharding}" if cfg.gpus > 1 else ""))
    print(memory.format_table(b))
    if generic:
        print(f"a coarser estimate: {arch.model_type} runs on the generic path (transformers' own "
              "modules); weights counted exactly, activations estimated from the model's width, "
              "never measured")
    elif arch.moe is not None:
        print("a mixture of experts: its expert and routed terms are counted against the CPU's "
              "tensors (tests/test_moe.py); measured on an H100: Qwen3-30B-A3B at seq 2048 "
              "(attention not kept, its step in a CUDA graph), 21.84 GiB planned, 21.53 "
              "measured (docs/MEMORY.md)")
    elif arch.model_type in memory.CALIBRATED_FAMILIES:
        print("checked on an H100 against measured peaks: the 19 it was calibrated on within 2%, "
              "configurations measured since within 10% (docs/MEMORY.md)")
    else:
        print(f"{arch.model_type}: its layer's terms are derived from what autograd keeps (checked "
              "on the CPU); no GPU peak of this family has been measured yet (docs/MEMORY.md)")
    if gpu_bytes is None:
        print("no --gpu-memory given and no GPU detected: not checking whether it fits")
        return
    need = memory.needed_bytes(b)
    if memory.fits(b, gpu_bytes):
        print(f"fits on {gpu_name}: needs ~{need / memory.GiB:.1f} of {gpu_bytes / memory.GiB:.1f} GiB")
        n = memory.attention_layers_that_fit(arch, cfg, gpu_bytes)
        if n and not cfg.keep_attention:
            kept = memory.plan(arch, replace(cfg, keep_attention=n))
            which = "every layer" if n == arch.num_layers else f"the last {n} of {arch.num_layers} layers"
            print(f"qlora train keeps attention for backward in {which} here (keep_attention, "
                  f"faster): peak allocated ~{kept.allocated / memory.GiB:.2f} GiB; "
                  f"--keep-attention{'' if n == arch.num_layers else f' {n}'} shows that plan")
        _say_whole_layers(memory, arch, replace(cfg, keep_attention=cfg.keep_attention or n),
                          gpu_bytes)
    else:
        if memory.fits_tightly(b, gpu_bytes):
            print(memory.tight_fit_line(b, gpu_bytes, gpu_name))
        else:
            print(f"does NOT fit on {gpu_name}: needs ~{need / memory.GiB:.1f} of "
                  f"{gpu_bytes / memory.GiB:.1f} GiB (peak allocated alone "
                  f"~{b.allocated / memory.GiB:.2f} GiB)")
        for advice in memory.advise(arch, cfg, gpu_bytes):
            if advice.changes:
                print(f"  fits with {advice.text}: ~{memory.needed_bytes(advice.breakdown) / memory.GiB:.1f} GiB")
            else:
                print(f"  {advice.text}")
    if args.auto_fit:
        best = memory.auto_fit(arch, cfg, gpu_bytes)
        if best is None:
            print("auto-fit: nothing fits, even at micro-batch 1 with checkpointing")
        else:
            print(f"auto-fit: --micro-batch {best.micro_batch} "
                  f"--{'' if best.checkpointing else 'no-'}checkpointing")


# --- compare ------------------------------------------------------------------------------------
def add_compare(sub) -> None:
    p = sub.add_parser("compare", help="PEFT methods compared: params, predicted memory, demo-task quality",
                       description="Train each PEFT method on the demo task (CPU), predict its GPU memory for "
                                   "the Llama-3-8B shape, write compare.json, compare.md and compare.png.")
    p.fill = _compare_options
    p.set_defaults(func=run_compare)


def _compare_options(p) -> None:
    from qlora.compare import DEFAULT_STEPS, PEFT_METHODS

    p.add_argument("--out", default="runs/compare", help="output directory (default runs/compare)")
    p.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                   help=f"default all: {', '.join(PEFT_METHODS)}")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps per method (default {DEFAULT_STEPS})")
    p.add_argument("--gpu-results", help="measure_memory.py --methods output: fills the GPU columns")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the comparison in an existing --out (a non-empty --out is "
                        "refused otherwise)")


def run_compare(args) -> None:
    from qlora.compare import run

    run(out_dir=args.out, methods=args.methods, steps=args.steps, gpu_results=args.gpu_results,
        overwrite=args.overwrite)


def _plan_gpu_bytes(args, memory):
    if args.gpu_memory:
        return memory.parse_size(args.gpu_memory), f"a {args.gpu_memory} GPU"
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return props.total_memory, f"{props.name} ({props.total_memory / memory.GiB:.0f} GiB)"
    except ImportError:
        pass
    return None, None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except QloraError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
