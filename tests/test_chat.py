"""`qlora chat`: history rendered through the model's chat template, /reset, /exit and end of input
with piped stdin, dropping the oldest turns when the context is full, and an over-long message."""

from __future__ import annotations

import io

import pytest
import torch

from qlora import cli
from qlora.chat import ChatSession, chat_template_for, stop_token_ids
from qlora.errors import QloraError
from qlora.infer import GenerationOptions, generate
from qlora.tiny import build_tiny_model

CONTEXT = 96  # a small context, so that a few turns fill it


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from qlora.models import load_model, load_tokenizer
    from qlora.quant import QuantConfig

    model_dir = build_tiny_model(tmp_path_factory.mktemp("chat") / "tiny", "llama", seed=7,
                                 max_position_embeddings=CONTEXT)
    model = load_model(model_dir, QuantConfig(method="none", compute_dtype=torch.float32))
    tok = load_tokenizer(model_dir)
    return {"dir": model_dir, "model": model, "tok": tok}


def _session(setup, max_new_tokens=8, system=None):
    tok = setup["tok"]
    template = chat_template_for(tok)
    opts = GenerationOptions(max_new_tokens=max_new_tokens,
                             eos_token_ids=stop_token_ids(tok, setup["dir"], template))
    return ChatSession(setup["model"], tok, template, opts, system=system, context=CONTEXT)


def _render(tok, messages):
    # transformers renders the conversation with the tokenizer's own template
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_two_turns_keep_history_and_reset(setup):
    tok, model = setup["tok"], setup["model"]
    s = _session(setup, system="Be brief.")
    ids1, opts1, notes = s.prepare("hi")
    assert notes == [] and ids1 == _render(tok, [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "hi"}])
    r1 = s.answer("hi", ids1, opts1)
    # the reply is qlora.infer.generate's greedy tokens, stopped at <|im_end|>/</s>
    new = generate(model, ids1, GenerationOptions(max_new_tokens=8, eos_token_ids=(2, 4)))
    assert r1 == tok.decode([t for t in new if t not in (2, 4)], skip_special_tokens=True)

    ids2, _, _ = s.prepare("and?")
    assert ids2 == _render(tok, [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": r1.strip()},
                                 {"role": "user", "content": "and?"}])
    s.answer("and?", ids2, opts1)
    assert [m["role"] for m in s.history] == ["user", "assistant", "user", "assistant"]
    s.reset()
    assert s.history == []
    assert s.prepare("hi")[0] == ids1


def test_oldest_turns_dropped_when_context_is_full(setup):
    s = _session(setup, max_new_tokens=16)
    s.history = [{"role": "user", "content": "a" * 20}, {"role": "assistant", "content": "b" * 10},
                 {"role": "user", "content": "c" * 20}, {"role": "assistant", "content": "d" * 10}]
    # ChatML with the char tokenizer: a user turn is 1 + len("user\n") + n + 2 tokens, an
    # assistant turn 1 + len("assistant\n") + n + 2, the generation prompt 1 + 10 tokens.
    # Everything: 28 + 23 + 28 + 23 + (8 + 10 + 11) = 131 > 96 - 16; without the first exchange
    # 51 + 29 = 80 <= 80: exactly one exchange goes.
    ids, opts, notes = s.prepare("e" * 10)
    assert len(ids) == 80 and opts.max_new_tokens == 16
    assert len(notes) == 1 and "dropped the oldest 1 exchange" in notes[0]
    assert [m["content"][0] for m in s.history] == ["c", "d"]


def test_answer_shortened_when_only_the_message_is_left(setup):
    s = _session(setup, max_new_tokens=50)
    ids, opts, notes = s.prepare("f" * 50)  # 8 + 50 + 11 = 69 tokens: 27 left for the answer
    assert len(ids) == 69 and opts.max_new_tokens == CONTEXT - 69
    assert any("27 new tokens fit" in n for n in notes)


def test_overlong_message_is_refused_and_history_kept(setup):
    s = _session(setup)
    s.history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(QloraError, match=rf"too long.*context.*{CONTEXT}"):
        s.prepare("g" * 200)
    assert len(s.history) == 2


def _chat(setup, monkeypatch, capsys, stdin_text, *extra):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin_text))
    rc = cli.main(["chat", "--model", str(setup["dir"]), "--quant", "none", "--device", "cpu",
                   "--max-new-tokens", "6", *extra])
    return rc, capsys.readouterr()


def test_piped_chat_two_turns_reset_exit(setup, monkeypatch, capsys):
    rc, cap = _chat(setup, monkeypatch, capsys,
                    "hello\nsecond turn\n/reset\nthird\n/exit\nnever answered\n",
                    "--system", "Be brief.")
    assert rc == 0
    out = cap.out
    assert out.count("assistant> ") == 3
    assert "[conversation cleared]" in out
    assert "never answered" not in out
    # the first and the third turn start from the same (empty) history: same greedy answer
    answers = [line.removeprefix("assistant> ") for line in out.splitlines()
               if line.startswith("assistant> ")]
    s = _session(setup, max_new_tokens=6, system="Be brief.")
    assert answers[0] == s.reply("hello")
    s.reset()
    assert answers[2] == s.reply("third")


def test_piped_chat_end_of_input_and_overlong_message(setup, monkeypatch, capsys):
    rc, cap = _chat(setup, monkeypatch, capsys, "x" * 300 + "\nshort\n")  # no /exit: EOF ends it
    assert rc == 0
    assert "your message is too long" in cap.out and f"is {CONTEXT} tokens" in cap.out
    assert cap.out.count("assistant> ") == 1  # the long one is not sent, the short one is
    assert "Traceback" not in cap.err


def test_chat_missing_model_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    missing = tmp_path / "gone"
    assert cli.main(["chat", "--model", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_a_template_that_refuses_the_conversation_is_a_clear_error(tmp_path):
    from transformers import AutoTokenizer

    from qlora.chat import build_prompt, conversation

    path = build_tiny_model(tmp_path / "m", "llama")
    tok = AutoTokenizer.from_pretrained(str(path))
    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}"
              "{{ raise_exception('System role not supported') }}{% endif %}"
              "{{ m['content'] }}{% endfor %}")
    with pytest.raises(QloraError, match="System role not supported.*--system"):
        build_prompt(tok, conversation("hi", system="be brief"), strict)
