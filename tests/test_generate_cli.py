"""`qlora generate`: the CLI prints what qlora.infer.generate produces (greedy), with the chat
template or without, from arguments or files; it stops at EOS and end-of-turn tokens; streamed
text is whole characters; bad inputs are refused with exit code 2 and a message naming them."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from qlora import cli
from qlora.chat import TextStream, stop_token_ids, stream_reply
from qlora.errors import QloraError
from qlora.infer import GenerationOptions, generate
from qlora.tiny import build_tiny_model

IM_END, EOS = 4, 2  # the tiny tokenizer's <|im_end|> and </s>


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from qlora.adapters import AdapterConfig, attach_adapters, save_adapter
    from qlora.models import load_model, load_tokenizer
    from qlora.quant import QuantConfig

    root = tmp_path_factory.mktemp("generate")
    model_dir = build_tiny_model(root / "tiny-llama", "llama", seed=5)
    other_dir = build_tiny_model(root / "other", "llama", seed=6, hidden_size=32, intermediate_size=64)
    other = load_model(other_dir, QuantConfig(method="none", compute_dtype=torch.float32))
    attach_adapters(other, AdapterConfig(r=2, alpha=4, dropout=0.0))
    other_adapter = save_adapter(other, root / "other-adapter", str(other_dir))
    model = load_model(model_dir, QuantConfig(method="none", compute_dtype=torch.float32))
    return {"model_dir": model_dir, "model": model, "tok": load_tokenizer(model_dir),
            "other_adapter": other_adapter}


def _expected(setup, prompt_ids, n):
    new = generate(setup["model"], prompt_ids, GenerationOptions(max_new_tokens=n,
                                                                 eos_token_ids=(EOS, IM_END)))
    text = setup["tok"].decode([t for t in new if t not in (EOS, IM_END)], skip_special_tokens=True)
    return new, text


def _chatml_ids(tok, prompt, system=None):
    # the prompt as the tokenizer's own chat template renders it (transformers, not our code)
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    return tok(text, add_special_tokens=False)["input_ids"]


def test_greedy_cli_matches_infer_generate(setup, capsys):
    tok = setup["tok"]
    ids = _chatml_ids(tok, "What is 2+2?", system="Be brief.")
    _, text = _expected(setup, ids, 24)
    rc = cli.main(["generate", "--model", str(setup["model_dir"]), "--quant", "none", "--device", "cpu",
                   "--max-new-tokens", "24", "--system", "Be brief.", "What is 2+2?"])
    assert rc == 0
    assert capsys.readouterr().out == text + "\n"


def test_no_chat_template_and_prompts_files(setup, tmp_path, capsys):
    tok = setup["tok"]
    prompts = ["The capital of France is", "1, 2, 3,"]
    plain = [_expected(setup, tok(p)["input_ids"], 12)[1] for p in prompts]
    rc = cli.main(["generate", "--model", str(setup["model_dir"]), "--quant", "none", "--device", "cpu",
                   "--max-new-tokens", "12", "--no-chat-template", *prompts])
    assert rc == 0
    out = capsys.readouterr().out
    assert out == f"### [1/2] {prompts[0]}\n{plain[0]}\n\n### [2/2] {prompts[1]}\n{plain[1]}\n"

    templated = [_expected(setup, _chatml_ids(tok, p), 12)[1] for p in prompts]
    txt = tmp_path / "prompts.txt"
    txt.write_text(prompts[0] + "\n\n" + prompts[1] + "\n")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(prompts)))
    for f in (txt, jsonl):
        assert cli.main(["generate", "--model", str(setup["model_dir"]), "--quant", "none", "--device", "cpu",
                         "--max-new-tokens", "12", "--prompts-file", str(f)]) == 0
        out = capsys.readouterr().out
        assert out == f"### [1/2] {prompts[0]}\n{templated[0]}\n\n### [2/2] {prompts[1]}\n{templated[1]}\n"


def test_nf4_default_runs_and_is_greedy_deterministic(setup, capsys):
    args = ["generate", "--model", str(setup["model_dir"]), "--max-new-tokens", "8", "hello"]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert cli.main(args) == 0
    assert capsys.readouterr().out == first


def test_stop_tokens_from_tokenizer_config_and_template(setup, tmp_path):
    from qlora.chat import chat_template_for

    tok = setup["tok"]
    template = chat_template_for(tok)
    assert set(stop_token_ids(tok, setup["model_dir"], template)) == {EOS, IM_END}
    assert stop_token_ids(tok, setup["model_dir"], None) == (EOS,)  # no template: EOS only
    # generation_config.json may name more end tokens (a list, as Llama 3 does)
    d = build_tiny_model(tmp_path / "m", "llama")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, 60]}))
    assert 60 in stop_token_ids(tok, d, None)


class _Forced(nn.Module):
    """lm_head that makes `token` the most likely next token once `after` tokens were made."""

    def __init__(self, head, token, after):
        super().__init__()
        self.head, self.token, self.after, self.calls = head, token, after, 0

    def forward(self, h):
        logits = self.head(h)
        if self.calls >= self.after:
            logits[..., self.token] += 1e4
        self.calls += 1
        return logits


@pytest.mark.parametrize("stop", [IM_END, EOS, 60])
def test_generation_stops_at_stop_tokens(setup, stop):
    model, tok = setup["model"], setup["tok"]
    ids = _chatml_ids(tok, "hi")
    head = model.lm_head
    model.lm_head = _Forced(head, stop, after=3)  # three free tokens, then the stop token
    try:
        new, text = stream_reply(model, tok, ids, GenerationOptions(
            max_new_tokens=20, eos_token_ids=(EOS, IM_END, 60)))
    finally:
        model.lm_head = head
    assert len(new) == 4 and new[-1] == stop
    assert text == tok.decode(new[:3], skip_special_tokens=True)


def test_text_stream_keeps_multibyte_characters_whole():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # byte-level BPE without merges: "世" is three tokens, one per UTF-8 byte
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    t = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=t)
    text = "héllo 世界, naïve café ☕!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    naive = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in naive)  # token-by-token decoding breaks characters
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "世" in pieces and "☕" in pieces


def test_the_library_refuses_an_adapter_of_another_base_as_the_cli_does(setup, tmp_path):
    """load_for_inference and run_eval, called directly, make the base-name check generate, chat
    and eval make (before any weight or data file is read: the data file here does not exist)."""
    from qlora.eval import run_eval
    from qlora.infer import load_for_inference

    model, other = str(setup["model_dir"]), str(setup["other_adapter"])
    with pytest.raises(QloraError, match="base_model_name_or_path.*--ignore-base-name"):
        load_for_inference(model, other, quant="none", device="cpu")
    with pytest.raises(QloraError, match="base_model_name_or_path.*--ignore-base-name"):
        run_eval(model, str(tmp_path / "absent.jsonl"), other, quant="none", device="cpu",
                 log=lambda _line: None)


def test_bad_inputs(setup, tmp_path, capsys):
    model = str(setup["model_dir"])
    missing = tmp_path / "no-such-model"
    assert cli.main(["generate", "--model", str(missing), "hi"]) == 2
    assert str(missing) in capsys.readouterr().err

    assert cli.main(["generate", "--model", model, "--quant", "none",
                     "--adapter", str(setup["other_adapter"]), "hi"]) == 2
    err = capsys.readouterr().err  # refused on its name first, as merge and export refuse it
    assert "adapter_config.json base_model_name_or_path" in err and "--ignore-base-name" in err
    assert cli.main(["generate", "--model", model, "--quant", "none", "--ignore-base-name",
                     "--adapter", str(setup["other_adapter"]), "hi"]) == 2
    err = capsys.readouterr().err  # told to go on: then its shapes do not fit
    assert "adapter_model.safetensors" in err and "another base model" in err

    no_adapter = tmp_path / "no-adapter"
    assert cli.main(["generate", "--model", model, "--adapter", str(no_adapter), "hi"]) == 2
    assert str(no_adapter) in capsys.readouterr().err

    assert cli.main(["generate", "--model", model]) == 2
    assert "no prompt" in capsys.readouterr().err

    no_file = tmp_path / "prompts.txt"
    assert cli.main(["generate", "--model", model, "--prompts-file", str(no_file)]) == 2
    assert str(no_file) in capsys.readouterr().err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    assert cli.main(["generate", "--model", model, "--prompts-file", str(bad)]) == 2
    assert f"{bad} line 2" in capsys.readouterr().err

    # the tiny model's context is 512 tokens
    assert cli.main(["generate", "--model", model, "--quant", "none", "x" * 600]) == 2
    err = capsys.readouterr().err
    assert "context" in err and "512" in err

    # a prompt that fits, with an answer that would not: the answer is shortened, and said so
    assert cli.main(["generate", "--model", model, "--quant", "none", "--max-new-tokens", "100",
                     "x" * 450]) == 0
    assert "new tokens fit" in capsys.readouterr().err


# --- prompts rendered as the adapter was trained (the run's prompt_format.json) ------------------
# A template of its own (no {% generation %} markers), so that a record naming it is seen to be used
# rather than the tokenizer's ChatML.
BRACKETS = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


@pytest.fixture(scope="module")
def run_adapter(setup, tmp_path_factory):
    """An adapter of the tiny model in a run directory as `qlora train` leaves it (run_config.yaml
    beside it), and a copy of it alone, as from elsewhere (no record)."""
    import shutil

    from qlora.adapters import AdapterConfig, attach_adapters, save_adapter
    from qlora.models import load_model
    from qlora.quant import QuantConfig

    root = tmp_path_factory.mktemp("run")
    m = load_model(setup["model_dir"], QuantConfig(method="none", compute_dtype=torch.float32))
    attach_adapters(m, AdapterConfig(r=2, alpha=4, dropout=0.0))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapter change the answers
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    run = save_adapter(m, root / "run", str(setup["model_dir"]))
    (run / "run_config.yaml").write_text("# a training run's configuration\n")
    alone = shutil.copytree(run, root / "adapter-alone", ignore=shutil.ignore_patterns("run_*"))
    return {"run": run, "alone": alone, "model": m.eval()}


def _training_prompt_ids(example, tok, chat_template=None):
    """The tokens training put before the response: the encoded example up to its first labelled
    token (data/templates.py's encode_example, what `qlora train` feeds the model)."""
    from qlora.data.templates import IGNORE, encode_example

    enc = encode_example(example, tok, "responses", chat_template)
    first = next(i for i, label in enumerate(enc["labels"]) if label != IGNORE)
    return enc["input_ids"][:first]


def _fed_ids(monkeypatch):
    """The prompt ids generate/chat hand to the model, recorded."""
    import qlora.chat

    fed, real = [], qlora.chat.stream
    monkeypatch.setattr(qlora.chat, "stream", lambda model, ids, opts: (fed.append(list(ids)),
                                                                        real(model, ids, opts))[1])
    return fed


def _generate(setup, adapter, prompt, *flags):
    return cli.main(["generate", "--model", str(setup["model_dir"]), "--adapter", str(adapter),
                     "--quant", "none", "--device", "cpu", "--max-new-tokens", "6", *flags, prompt])


@pytest.mark.parametrize("fmt", ["alpaca", "prompt_completion", "messages"])
def test_generate_renders_the_prompt_as_training_did(setup, run_adapter, monkeypatch, capsys, fmt):
    from qlora.data import Example
    from qlora.train.output import write_prompt_format

    tok, run, prompt = setup["tok"], run_adapter["run"], "Name a colour"
    option = BRACKETS if fmt == "messages" else None
    example = {"alpaca": Example("alpaca", "t:1", instruction=prompt, output="blue"),
               "prompt_completion": Example("prompt_completion", "t:1", prompt=prompt, completion="blue"),
               "messages": Example("messages", "t:1", messages=[
                   {"role": "user", "content": prompt}, {"role": "assistant", "content": "blue"}]),
               }[fmt]
    expected = _training_prompt_ids(example, tok, option)
    if fmt == "alpaca":  # the seeds' alpaca prompt, up to the response
        assert tok.decode(expected, skip_special_tokens=True).endswith(
            f"### Instruction:\n{prompt}\n\n### Response:\n")
    write_prompt_format(run, fmt, option)
    fed = _fed_ids(monkeypatch)
    assert _generate(setup, run, prompt) == 0
    out, err = capsys.readouterr()
    assert fed == [expected]
    rendering = {"alpaca": "the alpaca prompt", "prompt_completion": "plain text, no chat template",
                 "messages": "chat template, given as a template string"}[fmt]
    line = next(ln for ln in err.splitlines() if ln.startswith("prompt rendering: "))
    assert rendering in line and "prompt_format.json" in line
    # the text printed is what the adapter answers to those tokens (qlora.infer.generate)
    new = generate(run_adapter["model"], expected, GenerationOptions(
        max_new_tokens=6, eos_token_ids=(EOS, IM_END)))
    assert out == tok.decode([t for t in new if t not in (EOS, IM_END)], skip_special_tokens=True) + "\n"


@pytest.mark.parametrize("chat", [False, True])
def test_generate_renders_a_preference_adapters_prompt_as_its_training_did(
        setup, run_adapter, monkeypatch, capsys, chat):
    """A DPO/ORPO/SimPO/KTO run records its layout and whether its prompts went through the chat
    template (train/data.load_data): generate feeds the prompt ids data/preference.Encoder made
    in training, plain text or the template's head with its generation prompt."""
    from qlora.data.preference import Encoder
    from qlora.train.output import write_prompt_format

    tok, run, prompt = setup["tok"], run_adapter["run"], "Name a colour"
    option = BRACKETS if chat else None
    question = [{"role": "user", "content": prompt}] if chat else prompt
    answer = [{"role": "assistant", "content": "blue"}] if chat else "blue"
    expected, _ = Encoder(tok, option).encode(question, answer)
    write_prompt_format(run, "pairs", option, chat=chat)
    fed = _fed_ids(monkeypatch)
    assert _generate(setup, run, prompt) == 0
    line = next(ln for ln in capsys.readouterr().err.splitlines()
                if ln.startswith("prompt rendering: "))
    assert fed == [expected]
    assert ("chat template" if chat else "plain text, no chat template") in line
    assert "pairs data" in line


def test_flags_win_over_the_record_and_no_record_keeps_the_chat_template(
        setup, run_adapter, monkeypatch, capsys):
    from qlora.train.output import write_prompt_format

    tok, run, prompt = setup["tok"], run_adapter["run"], "Name a colour"
    write_prompt_format(run, "alpaca", None)
    fed = _fed_ids(monkeypatch)
    assert _generate(setup, run, prompt, "--no-chat-template") == 0
    assert "prompt rendering: plain text (--no-chat-template)" in capsys.readouterr().err
    assert _generate(setup, run, prompt, "--chat-template", BRACKETS) == 0
    assert "(--chat-template)" in capsys.readouterr().err
    # an adapter without its run's record (from elsewhere): the model's chat template, as before
    assert _generate(setup, run_adapter["alone"], prompt) == 0
    assert "the model's chat template (the default" in capsys.readouterr().err
    bracketed = tok.apply_chat_template([{"role": "user", "content": prompt}], chat_template=BRACKETS,
                                        tokenize=False, add_generation_prompt=True)
    assert fed == [tok(prompt)["input_ids"], tok(bracketed, add_special_tokens=False)["input_ids"],
                   _chatml_ids(tok, prompt)]


def test_chat_with_an_alpaca_adapter_renders_each_message_as_training_did(
        setup, run_adapter, monkeypatch, capsys):
    import io

    from qlora.data import Example
    from qlora.train.output import write_prompt_format

    write_prompt_format(run_adapter["run"], "alpaca", None)
    fed = _fed_ids(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO("Say hi\nCount to three\n/exit\n"))
    assert cli.main(["chat", "--model", str(setup["model_dir"]), "--adapter", str(run_adapter["run"]),
                     "--quant", "none", "--device", "cpu", "--max-new-tokens", "4"]) == 0
    assert "prompt rendering: the alpaca prompt" in capsys.readouterr().err
    assert fed == [_training_prompt_ids(Example("alpaca", "t:1", instruction=m, output="x"), setup["tok"])
                   for m in ("Say hi", "Count to three")]


def test_a_damaged_record_is_refused_naming_it(setup, run_adapter, capsys):
    record = run_adapter["run"] / "prompt_format.json"
    record.write_text("{not json")
    try:
        assert _generate(setup, run_adapter["run"], "hi") == 2
    finally:
        record.unlink()
    err = capsys.readouterr().err
    assert str(record) in err and "--no-chat-template" in err
