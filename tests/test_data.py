"""Data layer: loading and format detection, which tokens carry loss, bad data, caching, packing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qlora.data import formats, packing, templates
from qlora.data.formats import load_examples
from qlora.data.packing import batch_order, iterate_batches, make_batch, pack_examples
from qlora.data.templates import alpaca_prompt, encode_example, encode_prompt, prepare, split_validation
from qlora.errors import QloraError

# Copied by hand from the seeds (qlora-notebook.txt), not from our code.
SEED_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}")
SEED_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n{output}")

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello!"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from qlora.tiny import build_tokenizer

    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(d)
    return AutoTokenizer.from_pretrained(str(d))


@pytest.fixture(scope="module")
def tok_no_template(tmp_path_factory):
    from transformers import AutoTokenizer

    from qlora.tiny import build_tokenizer

    d = tmp_path_factory.mktemp("tok_plain")
    build_tokenizer(d, chat_template=None)
    return AutoTokenizer.from_pretrained(str(d))


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def labelled(enc, tok) -> str:
    return tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100])


def labelled_ids(enc):
    return [lab for lab in enc["labels"] if lab != -100]


# ---------------------------------------------------------------------------------------------
# Formats


@pytest.mark.parametrize("row,fmt", [
    ({"instruction": "a", "input": "b", "output": "c"}, "alpaca"),
    ({"instruction": "a", "output": "c", "text": "ignored"}, "alpaca"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}, "sharegpt"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages"),
    ({"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "messages"),
    ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ({"text": "hello"}, "text"),
])
def test_format_detection(tmp_path, row, fmt):
    examples, problems = load_examples(write_jsonl(tmp_path / "d.jsonl", [row, row]))
    assert problems == []
    assert [e.format for e in examples] == [fmt, fmt]
    assert examples[1].source.endswith("d.jsonl:2")


def test_preference_rows_are_refused_for_training_only(tmp_path):
    """Supervised training refuses preference rows of undeclared format (a forgotten --method);
    eval, the export check and the importance matrix read their prompts and completions as they
    are. Labels KTO reads (booleans, 0 / 1, true / false / yes / no as text: a CSV's are
    text) are refused; a label KTO would not read is a class label of supervised data: not."""
    def rows(name, make):
        path = tmp_path / name
        path.write_text("".join(json.dumps(make(i)) + "\n" for i in range(6)))
        return str(path)

    kto = rows("kto.jsonl", lambda i: {"prompt": "p", "completion": f"c{i}", "label": i % 2 == 0})
    pairs = rows("pairs.jsonl", lambda i: {"prompt": "p", "chosen": "a", "rejected": "b"})
    classes = rows("classes.jsonl", lambda i: {"prompt": "p", "completion": "c", "label": i % 3})
    with pytest.raises(QloraError, match="kto.jsonl.*unpaired preferences.*--method kto"):
        load_examples(kto, refuse_preferences=True)
    words = rows("words.jsonl", lambda i: {"prompt": "p", "completion": "c", "label": "false"})
    csv_path = tmp_path / "kto.csv"
    csv_path.write_text("prompt,completion,label\n" + "".join(f"p,c{i},{'true' if i % 2 else 'false'}\n"
                                                           for i in range(6)))
    for path in (words, str(csv_path)):
        with pytest.raises(QloraError, match="unpaired preferences.*--method kto"):
            load_examples(path, refuse_preferences=True)
    with pytest.raises(QloraError, match="pairs.jsonl.*preference pairs.*--method dpo"):
        load_examples(pairs, refuse_preferences=True)
    # pairs as whole conversations, their prompt the history they share: no prompt column
    chats = rows("chats.jsonl", lambda i: {
        "chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "b"}]})
    with pytest.raises(QloraError, match="columns chosen, rejected are preference pairs"):
        load_examples(chats, refuse_preferences=True)
    # and as whole texts (hh-rlhf's), their prompt the text they share
    texts = rows("texts.jsonl", lambda i: {"chosen": "Human: p Assistant: a",
                                           "rejected": "Human: p Assistant: b"})
    with pytest.raises(QloraError, match="columns chosen, rejected are preference pairs"):
        load_examples(texts, refuse_preferences=True)
    examples, problems = load_examples(kto)  # not training: read as prompt_completion
    assert [e.completion for e in examples] == [f"c{i}" for i in range(6)] and not problems
    # named explicitly, the KTO rows train as prompt_completion (the refusal's way out)
    assert len(load_examples(kto, "prompt_completion", refuse_preferences=True)[0]) == 6
    assert len(load_examples(classes, refuse_preferences=True)[0]) == 6


def test_format_override_and_unknown_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c", "text": "t"}])
    assert load_examples(path)[0][0].format == "prompt_completion"
    assert load_examples(path, fmt="text")[0][0].text == "t"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(QloraError) as e:
        load_examples(bad)
    msg = str(e.value)
    assert "answer" in msg and "question" in msg and "--data_format" in msg
    for fmt in formats.FORMATS:
        assert fmt in msg
    with pytest.raises(QloraError, match="unknown data format"):
        load_examples(path, fmt="chatml")


def test_sharegpt_roles_map_to_messages(tmp_path, tok):
    sg = {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                             "value": m["content"]} for m in CHAT]}
    (ex_sg,), _ = load_examples(write_jsonl(tmp_path / "sg.jsonl", [sg]))
    (ex_m,), _ = load_examples(write_jsonl(tmp_path / "m.jsonl", [{"messages": CHAT}]))
    assert ex_sg.messages == CHAT == ex_m.messages
    assert encode_example(ex_sg, tok) == encode_example(ex_m, tok)


# ---------------------------------------------------------------------------------------------
# Which tokens carry loss


def chat_example(messages=CHAT):
    return formats.Example("messages", "t:1", messages=messages)


def test_chat_labels_are_every_assistant_turn(tok):
    enc = encode_example(chat_example(), tok)
    assert enc["input_ids"] == tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert labelled(enc, tok) == "hello!<|im_end|>4<|im_end|>"
    assert enc["labels"][0] == -100


# ChatML without {% generation %} markers: the prefix-by-prefix path must find the same tokens.
PLAIN_CHATML = templates.CHATML_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
# A template that renders earlier assistant turns differently once the conversation goes on
# (as Qwen3's does with thinking), so prefixes are not prefixes of the whole.
HISTORY_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' and not loop.last %}{{ '(old) ' }}{% endif %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("template", [PLAIN_CHATML, HISTORY_TEMPLATE])
def test_chat_labels_without_generation_markers(tok, template):
    enc = encode_example(chat_example(), tok, chat_template=template)
    full = tok.apply_chat_template(CHAT, chat_template=template, tokenize=False)
    assert tok.decode(enc["input_ids"]) == full
    assert labelled(enc, tok) == "hello!<|im_end|>4<|im_end|>"


def test_chat_train_on_all(tok):
    enc = encode_example(chat_example(), tok, train_on="all")
    assert enc["labels"] == [-100] + enc["input_ids"][1:]


def test_alpaca_prompt_is_the_seeds(tok):
    assert alpaca_prompt("Add", "1 2") == SEED_WITH_INPUT.format(instruction="Add", input="1 2", output="")
    assert alpaca_prompt("Add", "  ") == SEED_WITHOUT_INPUT.format(instruction="Add", output="")
    assert alpaca_prompt("Add") == SEED_WITHOUT_INPUT.format(instruction="Add", output="")


@pytest.mark.parametrize("inp", ["1 2", ""])
def test_alpaca_labels_are_output_plus_eos(tok, inp):
    ex = formats.Example("alpaca", "t:1", instruction="Add the numbers", input=inp, output="3 apples")
    enc = encode_example(ex, tok)
    seed_text = (SEED_WITH_INPUT if inp else SEED_WITHOUT_INPUT).format(
        instruction="Add the numbers", input=inp, output="3 apples")
    assert tok.decode(enc["input_ids"]) == seed_text + tok.eos_token
    assert labelled(enc, tok) == "3 apples" + tok.eos_token
    assert enc["input_ids"][-1] == tok.eos_token_id
    ids, ref = encode_prompt(ex, tok)
    assert tok.decode(ids) + ref == seed_text and ids == enc["input_ids"][:len(ids)]


def test_bos_adding_tokenizer(tmp_path):
    """Llama-style tokenizers add BOS themselves: it must stay unlabelled and appear once."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    from qlora.tiny import build_tokenizer

    build_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    ex = formats.Example("alpaca", "t:1", instruction="Add", input="", output="3")
    enc = encode_example(ex, tok)
    assert enc["input_ids"][0] == tok.bos_token_id and enc["input_ids"].count(tok.bos_token_id) == 1
    assert labelled(enc, tok) == "3" + tok.eos_token


def test_prompt_completion_and_text_labels(tok):
    pc = formats.Example("prompt_completion", "t:1", prompt="Q: 2+2=", completion=" 4")
    enc = encode_example(pc, tok)
    assert labelled(enc, tok) == " 4" + tok.eos_token
    assert tok.decode(enc["input_ids"]) == "Q: 2+2= 4" + tok.eos_token
    text = formats.Example("text", "t:1", text="plain words")
    enc = encode_example(text, tok)
    assert tok.decode(enc["input_ids"]) == "plain words" + tok.eos_token
    assert enc["labels"] == [-100] + enc["input_ids"][1:]
    with pytest.raises(QloraError):
        encode_prompt(text, tok)


def test_chat_encode_prompt_matches_generation_prompt(tok):
    ids, ref = encode_prompt(chat_example(), tok)
    assert ref == "4"
    assert tok.decode(ids) == tok.apply_chat_template(CHAT[:-1], tokenize=False, add_generation_prompt=True)


def test_no_chat_template_is_refused_with_fallbacks(tmp_path, tok_no_template):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": CHAT}])
    with pytest.raises(QloraError) as e:
        prepare(path, tok_no_template, cache=False)
    assert "chat_template: chatml" in str(e.value) and "alpaca" in str(e.value)
    examples, _ = prepare(path, tok_no_template, chat_template="chatml", cache=False)
    assert labelled(examples[0], tok_no_template) == "hello!<|im_end|>4<|im_end|>"


# ---------------------------------------------------------------------------------------------
# Bad data


def test_unparsable_line_reported_with_file_and_line(tmp_path, tok):
    good = {"instruction": "a", "output": "b"}
    path = write_jsonl(tmp_path / "d.jsonl", [good, '{"instruction": "x", "output": ', good, "[1, 2]"])
    examples, report = prepare(path, tok, cache=False)
    assert len(examples) == 2 and report.n_rows == 4
    lines = "\n".join(report.lines())
    assert "from 4 rows (2 left out, listed below)" in lines  # the run goes on without them
    assert "d.jsonl line 2: not valid JSON" in lines
    assert "d.jsonl line 4: not a JSON object" in lines
    only_bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops", "", "nope"])
    with pytest.raises(QloraError, match=r"bad\.jsonl.*line 1.*line 3|bad\.jsonl.*lines 1, 3"):
        prepare(only_bad, tok, cache=False)


def test_missing_field_and_empty_response(tmp_path, tok):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "a"}, {"instruction": "a", "output": "  "},
            {"output": "b"}]
    examples, problems = load_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    assert len(examples) == 1
    assert [(p.line, p.reason) for p in problems] == [
        (2, "missing 'output'"), (3, "empty 'output'"), (4, "missing 'instruction'")]
    chats = [{"messages": CHAT}, {"messages": CHAT[:2]},
             {"messages": CHAT[:2] + [{"role": "assistant", "content": ""}]},
             {"messages": [{"role": "robot", "content": "x"}]}]
    examples, problems = load_examples(write_jsonl(tmp_path / "c.jsonl", chats))
    assert len(examples) == 1
    reasons = [p.reason for p in problems]
    assert reasons[0] == "no assistant turn" and reasons[1] == "empty assistant response"
    assert "robot" in reasons[2]


def test_many_problems_are_counted(tmp_path):
    rows = [{"instruction": "a", "output": "" if i % 2 else "b"} for i in range(30)]
    _, problems = load_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    (line,) = formats.summarize_problems(problems)
    assert "d.jsonl" in line
    assert "15 examples" in line and "empty 'output'" in line and "lines 2, 4, 6" in line and "…" in line


def test_overlong_truncate_vs_drop(tmp_path, tok):
    rows = [{"prompt": "p", "completion": "x" * n} for n in (5, 50, 60, 8)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cut, rep = prepare(path, tok, max_len=20, overlong="truncate", cache=False)
    assert [len(e["input_ids"]) for e in cut] == [7, 20, 20, 10]  # p + completion + eos
    assert rep.n_truncated == 2 and rep.n_dropped == 0
    kept, rep = prepare(path, tok, max_len=20, overlong="drop", cache=False)
    assert [len(e["input_ids"]) for e in kept] == [7, 10]
    assert rep.n_dropped == 2 and rep.n_truncated == 0
    assert "lines 2, 3" in "\n".join(rep.lines())
    # A prompt longer than max_len leaves nothing to learn: dropped even when truncating.
    long_prompt = write_jsonl(tmp_path / "lp.jsonl", [{"prompt": "p" * 30, "completion": "c"}])
    with pytest.raises(QloraError, match="no usable examples.*prompt alone is longer"):
        prepare(long_prompt, tok, max_len=20, cache=False)


def test_empty_file_and_nothing_usable(tmp_path, tok):
    for name in ("e.jsonl", "e.json", "e.csv"):
        (tmp_path / name).write_text("")
        with pytest.raises(QloraError, match=rf"{name} is empty"):
            prepare(str(tmp_path / name), tok, cache=False)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    with pytest.raises(QloraError, match="empty"):
        prepare(str(blank), tok, cache=False)
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": ""}] * 3)
    with pytest.raises(QloraError, match=r"no usable examples out of 3 rows.*3 examples: empty 'output'"):
        prepare(path, tok, cache=False)


def test_missing_path_and_offline_hub_name(tmp_path, monkeypatch):
    with pytest.raises(QloraError, match="not found"):
        load_examples(str(tmp_path / "nope.jsonl"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(QloraError, match="local path"):
        load_examples("tatsu-lab/alpaca")


# ---------------------------------------------------------------------------------------------
# Other file types


ALPACA_ROWS = [{"instruction": "Add", "input": "1 2", "output": "3"},
               {"instruction": "Say\nhi, twice", "input": "", "output": "hi hi"}]


def check_alpaca(examples, problems, source):
    assert problems == []
    assert [(e.instruction, e.input, e.output) for e in examples] == [
        ("Add", "1 2", "3"), ("Say\nhi, twice", "", "hi hi")]
    assert examples[1].source == source


def test_csv(tmp_path):
    import csv

    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(ALPACA_ROWS)
    check_alpaca(*load_examples(str(path)), f"{path} row 2")


def test_parquet_json_and_save_to_disk(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ALPACA_ROWS)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    check_alpaca(*load_examples(str(tmp_path / "d.parquet")), f"{tmp_path / 'd.parquet'} row 2")
    ds.save_to_disk(str(tmp_path / "saved"))
    check_alpaca(*load_examples(str(tmp_path / "saved")), f"{tmp_path / 'saved'} row 2")
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    check_alpaca(*load_examples(str(tmp_path / "dd")), f"{tmp_path / 'dd'} row 2")
    assert len(load_examples(str(tmp_path / "dd"), split="test")[0]) == 1
    (tmp_path / "list.json").write_text(json.dumps(ALPACA_ROWS, indent=2))
    check_alpaca(*load_examples(str(tmp_path / "list.json")), f"{tmp_path / 'list.json'} row 2")
    (tmp_path / "field.json").write_text(json.dumps({"data": ALPACA_ROWS}))
    check_alpaca(*load_examples(str(tmp_path / "field.json")), f"{tmp_path / 'field.json'} row 2")
    (tmp_path / "broken.json").write_text('[\n  {"instruction": "a",\n  "output" "b"}\n]')
    with pytest.raises(QloraError, match="broken.json line 3"):
        load_examples(str(tmp_path / "broken.json"))


# ---------------------------------------------------------------------------------------------
# Cache and validation split


def test_second_prepare_does_not_tokenize(tmp_path, tok, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}] * 3)
    first, rep1 = prepare(path, tok, max_len=64, cache_dir=str(tmp_path / "cache"))
    assert not rep1.cache_hit

    def boom(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(templates, "encode_example", boom)
    second, rep2 = prepare(path, tok, max_len=64, cache_dir=str(tmp_path / "cache"))
    assert rep2.cache_hit and second == first and rep2.n_tokens == rep1.n_tokens
    # Different options or different bytes: a miss (and here, the tokenizer is called again).
    with pytest.raises(AssertionError, match="tokenized again"):
        prepare(path, tok, max_len=32, cache_dir=str(tmp_path / "cache"))
    Path(path).write_text(Path(path).read_text() + json.dumps({"messages": CHAT[:3]}) + "\n")
    with pytest.raises(AssertionError, match="tokenized again"):
        prepare(path, tok, max_len=64, cache_dir=str(tmp_path / "cache"))


def test_split_validation():
    items = list(range(50))
    train, val = split_validation(items, 0.1, seed=3)
    assert len(val) == 5 and sorted(train + val) == items and not set(train) & set(val)
    assert split_validation(items, 0.1, seed=3) == (train, val)
    assert split_validation(items, 0.1, seed=4)[1] != val
    with pytest.raises(QloraError):
        split_validation(items, 1.5)
    with pytest.raises(QloraError):
        split_validation([1], 0.5)


# ---------------------------------------------------------------------------------------------
# Packing and batches


def fake_examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(6, 100, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return out


def test_pack_examples_fits_each_example_once():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 65, (500,), generator=g).tolist()
    rows = pack_examples(lengths, max_len=64, seed=1)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert len(rows) <= 1.15 * sum(lengths) / 64  # close to the bound: packing actually packs
    assert pack_examples(lengths, 64, seed=1) == rows
    with pytest.raises(QloraError, match="longer than max_len"):
        pack_examples([10, 70], max_len=64)


def test_make_batch_positions_labels_padding():
    ex = fake_examples([3, 4, 2])
    ex[1]["labels"][0] = 55  # make_batch must still mask every example's first token
    batch = make_batch([[ex[0], ex[1]], [ex[2]]], pad_id=0)
    real_lengths = batch.pop("real_lengths")
    assert real_lengths.dtype == torch.long and real_lengths.tolist() == [7, 2]  # before padding
    assert all(v.dtype == torch.long and v.shape == (2, 7) for v in batch.values())
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4]]
    assert batch["input_ids"][0].tolist() == ex[0]["input_ids"] + ex[1]["input_ids"]
    assert batch["input_ids"][1].tolist() == ex[2]["input_ids"] + [0] * 5
    labels = batch["labels"].tolist()
    assert labels[0][0] == -100 and labels[0][3] == -100 and labels[0][4:] == ex[1]["input_ids"][1:]
    assert labels[1][2:] == [-100] * 5


def test_batches_seeded_resumable_and_unpacked_padding():
    ex = fake_examples([5, 9, 2, 7, 3, 8, 4])
    rows = packing.unpacked_rows(len(ex))
    assert batch_order(7, epoch=0, seed=1) == batch_order(7, epoch=0, seed=1)
    assert batch_order(7, epoch=0, seed=1) != batch_order(7, epoch=1, seed=1)
    assert sorted(batch_order(7, 2, 1)) == list(range(7))
    full = list(iterate_batches(ex, rows, 2, epoch=1, seed=5, pad_id=0))
    assert [k for k, _ in full] == [0, 1, 2, 3] and full[-1][1]["input_ids"].shape[0] == 1
    order = batch_order(7, 1, 5)
    for k, b in full:  # unpacked: each row one example, padded to the longest of its micro-batch
        lens = [len(ex[i]["input_ids"]) for i in order[2 * k:2 * k + 2]]
        assert b["input_ids"].shape[1] == max(lens)
        assert b["input_ids"][0, :lens[0]].tolist() == ex[order[2 * k]]["input_ids"]
    resumed = list(iterate_batches(ex, rows, 2, epoch=1, seed=5, pad_id=0, start=2))
    assert [k for k, _ in resumed] == [2, 3]
    for (k1, b1), (k2, b2) in zip(full[2:], resumed):
        assert k1 == k2 and all(torch.equal(b1[n], b2[n]) for n in b1)


def test_prepare_then_pack_end_to_end(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}] * 4 + [{"messages": CHAT[:3]}] * 3)
    examples, rep = prepare(path, tok, max_len=128, cache=False)
    packed = pack_examples(examples, 128, seed=0)
    assert len(packed) < len(examples)
    batches = [b for _, b in iterate_batches(examples, packed, 2, epoch=0, seed=0, pad_id=tok.pad_token_id)]
    n_label = sum(int((b["labels"] != -100).sum()) for b in batches)
    assert n_label == rep.n_label_tokens == sum(len(labelled_ids(e)) for e in examples)
    for b in batches:  # no loss at a seam: every document start is unlabelled
        assert (b["labels"][b["position_ids"] == 0] == -100).all()


def test_a_file_cached_unrefused_is_still_refused_for_training(tmp_path, tok):
    """KTO rows prepared by a command that reads them as prompt_completion (eval, the export
    check) are cached; training on the same file, options and tokenizer must still refuse them,
    not take that cache (the refusal is part of the cache key)."""
    path = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "p", "completion": f"c{i}",
                                                 "label": i % 2 == 0} for i in range(4)])
    cache = str(tmp_path / "cache")
    examples, report = prepare(path, tok, max_len=64, cache_dir=cache)
    assert len(examples) == 4 and not report.cache_hit
    assert prepare(path, tok, max_len=64, cache_dir=cache)[1].cache_hit
    with pytest.raises(QloraError, match="unpaired preferences.*--method kto"):
        prepare(path, tok, max_len=64, cache_dir=cache, refuse_preferences=True)
