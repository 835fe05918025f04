"""The `qlora` command: train · eval · generate · chat · merge · export · plan · bench · demo.

Each sub-command parses its options here and calls one function of the module that does the job.
"""

from __future__ import annotations

import argparse
import sys

from qlora.errors import QloraError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo(sub)
    add_train(sub)
    add_generate(sub)
    add_chat(sub)
    add_eval(sub)
    add_merge(sub)
    add_export(sub)
    add_plan(sub)
    return parser


# --- demo ---------------------------------------------------------------------------------------
def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train a tiny model on a bundled task, end to end, on the CPU")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.set_defaults(func=run_demo)


def run_demo(args) -> None:
    from qlora.demo import run

    run(out_dir=args.out)


# --- train --------------------------------------------------------------------------------------
def add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune adapters on a data file")
    p.set_defaults(func=lambda args: _not_yet("train"))


# --- generate -----------------------------------------------------------------------------------
def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with base (+ adapter)")
    p.set_defaults(func=lambda args: _not_yet("generate"))


# --- chat ---------------------------------------------------------------------------------------
def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="interactive multi-turn chat with base (+ adapter)")
    p.set_defaults(func=lambda args: _not_yet("chat"))


# --- eval ---------------------------------------------------------------------------------------
def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and generation metrics on a data file")
    p.set_defaults(func=lambda args: _not_yet("eval"))


# --- merge --------------------------------------------------------------------------------------
def add_merge(sub) -> None:
    p = sub.add_parser("merge", help="fold an adapter into a 16-bit Hugging Face checkpoint")
    p.set_defaults(func=lambda args: _not_yet("merge"))


# --- export -------------------------------------------------------------------------------------
def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a GGUF file for llama.cpp")
    p.set_defaults(func=lambda args: _not_yet("export"))


# --- plan ---------------------------------------------------------------------------------------
def add_plan(sub) -> None:
    p = sub.add_parser("plan", help="predict peak GPU memory of a run, and whether it fits")
    p.set_defaults(func=lambda args: _not_yet("plan"))


def _not_yet(name: str) -> None:
    raise QloraError(f"`qlora {name}` is not available in this build yet")


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
