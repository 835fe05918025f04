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
