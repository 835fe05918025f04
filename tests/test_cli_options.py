"""The `qlora` command line itself: negative option values, --version, a help line for every
option, no command in the help that does not exist, and `--help` / `--version` without torch."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

import pytest

import qlora
from qlora.cli import build_parser, main

HEAVY = ("torch", "transformers", "datasets", "bitsandbytes")


def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


# --- (a) negative numbers are option values -------------------------------------------------------
@pytest.mark.parametrize("option", [["--learning_rate", "-1e-3"], ["--learning-rate", "-1e-3"],
                                    ["--learning_rate=-1e-3"], ["--lr", "-1e-3"]])
def test_a_negative_learning_rate_reaches_config_validation(option, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"),
               "--output_dir", str(out), *option])
    err = capsys.readouterr().err
    assert rc == 2  # the config's own error, not argparse's (which exits)
    assert "learning_rate" in err and "-0.001" in err and "expected one argument" not in err
    assert not out.exists()


def test_negative_numbers_reach_the_other_commands_too():
    p = build_parser()
    args = p.parse_args(["generate", "--model", "m", "--temperature", "-1e-3", "--top-p", "-inf",
                         "--seed", "-7", "hello"])
    assert (args.temperature, args.top_p, args.seed, args.prompts) == (-1e-3, float("-inf"), -7,
                                                                       ["hello"])
    args = p.parse_args(["plan", "--shape", "llama-3-8b", "--lora-dropout", "-1e-3"])
    assert args.lora_dropout == -1e-3
    # after a flag that takes no value, or after `--`, a number stays a positional argument
    args = p.parse_args(["generate", "--model", "m", "--no-chat-template", "-5"])
    assert args.no_chat_template and args.prompts == ["-5"]
    args = p.parse_args(["generate", "--model", "m", "--", "-1e-3"])
    assert args.prompts == ["-1e-3"]


# --- (b) --version ----------------------------------------------------------------------------------
def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"qlora {qlora.__version__}"
    try:
        from importlib.metadata import version
        assert version("qlora") == qlora.__version__  # the installed distribution's own
    except ImportError:  # pragma: no cover
        pass


# --- (c) one help line for every option -------------------------------------------------------------
def test_every_option_of_every_command_has_one_line_of_help():
    parser = build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    for name, sub in commands(parser).items():
        sub.format_help()  # adds the options of commands that add them on first need
        options = [a for a in sub._actions if not isinstance(a, argparse._HelpAction)]
        assert options, name
        for action in options:
            text = action.help
            assert text and text != argparse.SUPPRESS, (name, action.option_strings or action.dest)
            assert "\n" not in text, (name, action.option_strings)


def test_train_help_says_what_resume_takes_and_what_each_none_default_means():
    from qlora.config import HELP, NONE_MEANS, RunConfig

    fields = dataclasses.fields(RunConfig)
    assert set(HELP) == {f.name for f in fields}  # a new option needs its line of help
    nones = {f.name for f in fields if f.default is None}
    assert nones and nones <= set(NONE_MEANS)
    train = commands(build_parser())["train"]
    train.format_help()
    helps = {a.dest: a.help for a in train._actions}
    for name in nones:
        assert f"default None ({NONE_MEANS[name]})" in helps[f"opt_{name}"], name
    assert "latest" in helps["opt_resume"] and "checkpoint directory" in helps["opt_resume"]
    for f in fields:
        assert helps[f"opt_{f.name}"].startswith(HELP[f.name]), f.name


# --- (d) the help lists the commands there are --------------------------------------------------------
def test_help_lists_only_commands_that_exist(capsys):
    parser = build_parser()
    listed = parser.description.split(":", 1)[1].rstrip(".").split("·")
    assert {c.strip() for c in listed} == set(commands(parser))
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "bench" not in capsys.readouterr().out


# --- (e) --help and --version import no heavy library -------------------------------------------------
CHECK = """
import json, sys
from qlora import cli
parser = cli.build_parser()
parser.format_help()
for argv in (["--help"], ["--version"]):
    try:
        cli.main(argv)
    except SystemExit:
        pass
print(json.dumps([m for m in {heavy!r} if m in sys.modules]))
"""


def test_help_and_version_import_no_heavy_library():
    # a fresh interpreter (this one has torch loaded); no timeout: what counts is what it imports
    done = subprocess.run([sys.executable, "-c", CHECK.format(heavy=HEAVY)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


# --- (f) bitsandbytes' advice to install `kernels` is not printed ------------------------------------
QUANTIZE = """
import torch
{first}
from qlora.quant import QuantConfig, quantize_linear
quantize_linear(torch.randn(64, 64), None, QuantConfig(method="nf4"), "cpu")
"""


def _stderr_of(first: str) -> str:
    # a fresh interpreter: bitsandbytes logs the advice once, when it is first imported
    done = subprocess.run([sys.executable, "-c", QUANTIZE.format(first=first)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr


def test_bitsandbytes_kernels_advice_is_not_printed():
    """bitsandbytes' CPU backend says, at import where the CPU has AVX512-BF16, "Failed to load
    CPU gemm_4bit_forward ... pip install kernels" (a package that fetches kernels from the
    hub); qlora imports it with that logger quietened."""
    if "pip install kernels" not in _stderr_of("import bitsandbytes"):
        pytest.skip("bitsandbytes gives no kernels advice on this CPU (nothing to quieten)")
    stderr = _stderr_of("")
    assert "gemm_4bit_forward" not in stderr and "pip install kernels" not in stderr, stderr
