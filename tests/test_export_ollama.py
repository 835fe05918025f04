"""`qlora export --ollama`: the Modelfile's Go template renders conversations exactly as the model's
Jinja template does.

Each conversation is rendered twice: by the Jinja template through transformers'
apply_chat_template (add_generation_prompt=True), and by the emitted Go template through the small
renderer below, written for this test from Go's text/template rules for the subset we emit (actions
with `-` trim markers, range over a slice with index and element variables, variable assignment,
if / else if / else, the builtins eq, ne, and, not, len, slice, and field access on `.` and `$`).
Ollama's own behaviour that the comparison needs is emulated as documented: a Modelfile SYSTEM is put
first when the conversation has no system message; BOS is added by the runtime when the GGUF says so.
"""

from __future__ import annotations

import json
import re
from collections import ChainMap

import pytest

from qlora.errors import QloraError
from qlora.export import ollama
from qlora.tiny import build_tiny_model, build_tokenizer

# --- a Go text/template renderer for the subset the exporter emits -----------------------------
ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
EXPR_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+)')


def _pieces(template: str) -> list[list]:
    """[kind, content] pieces with Go's trim markers applied to the neighbouring text."""
    out, pos = [], 0
    for m in ACTION.finditer(template):
        out.append(["text", template[pos:m.start()]])
        out.append(["action", m.group(2).strip(), bool(m.group(1)), bool(m.group(3))])
        pos = m.end()
    out.append(["text", template[pos:]])
    for i, piece in enumerate(out):
        if piece[0] == "action":
            if piece[2]:
                out[i - 1][1] = out[i - 1][1].rstrip(" \t\r\n")
            if piece[3]:
                out[i + 1][1] = out[i + 1][1].lstrip(" \t\r\n")
    return out


def _parse(pieces: list[list]) -> list:
    """A tree: ("text", s) · ("out", expr) · ("set", var, expr) · ("if", [(expr, body)], else_body)
    · ("range", index_var, elem_var, expr, body)."""
    root: list = []
    stack: list = [root]
    frames: list = []  # open if / range nodes
    for piece in pieces:
        if piece[0] == "text":
            if piece[1]:
                stack[-1].append(("text", piece[1]))
            continue
        action = piece[1]
        if action.startswith("range "):
            m = re.fullmatch(r"range (?:(\$\w+), (\$\w+) := )?(.+)", action)
            node = ("range", m.group(1), m.group(2), m.group(3), [])
            stack[-1].append(node)
            frames.append(node)
            stack.append(node[4])
        elif action.startswith("if "):
            node = ("if", [(action[3:], [])], [])
            stack[-1].append(node)
            frames.append(node)
            stack.append(node[1][0][1])
        elif action.startswith("else if "):
            stack.pop()
            frames[-1][1].append((action[8:], []))
            stack.append(frames[-1][1][-1][1])
        elif action == "else":
            stack.pop()
            stack.append(frames[-1][2])
        elif action == "end":
            stack.pop()
            frames.pop()
        elif re.match(r"\$\w+ :=", action):
            var, expr = action.split(" := ", 1)
            stack[-1].append(("set", var, expr))
        elif re.match(r"\$\w+ =", action):
            var, expr = action.split(" = ", 1)
            stack[-1].append(("assign", var, expr))
        else:
            stack[-1].append(("out", action))
    assert not frames, "unclosed action"
    return root


def _truthy(v) -> bool:
    return bool(v)  # Go: false, 0, nil and empty strings / slices are false


FUNCS = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "not": lambda a: not _truthy(a),
         "and": lambda a, b: b if _truthy(a) else a, "len": len, "slice": lambda x, i: x[i:]}


def _eval(expr: str, dot, variables: dict, root: dict):
    tokens = EXPR_TOKEN.findall(expr)

    def term(i):
        t = tokens[i]
        if t == "(":
            value, i = call(i + 1)
            assert tokens[i] == ")"
            return value, i + 1
        if t.startswith('"'):
            return json.loads(t), i + 1
        if re.fullmatch(r"-?\d+", t):
            return int(t), i + 1
        if t.startswith("$."):
            return root[t[2:]], i + 1
        if t.startswith("$"):
            return variables[t], i + 1
        if t == ".":
            return dot, i + 1
        if t.startswith("."):
            return dot[t[1:]], i + 1
        raise AssertionError(f"unknown term {t!r} in {expr!r}")

    def call(i):
        if tokens[i] in FUNCS:
            name, args, i = tokens[i], [], i + 1
            while i < len(tokens) and tokens[i] != ")":
                value, i = term(i)
                args.append(value)
            return FUNCS[name](*args), i
        return term(i)

    value, end = call(0)
    assert end == len(tokens), f"unparsed rest of {expr!r}"
    return value


def _run(nodes: list, dot, variables: dict, root: dict, out: list) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "out":
            out.append(str(_eval(node[1], dot, variables, root)))
        elif kind == "set":  # := declares in the innermost scope
            variables[node[1]] = _eval(node[2], dot, variables, root)
        elif kind == "assign":  # = changes the variable where it was declared (Go 1.11)
            scope = next(m for m in variables.maps if node[1] in m)
            scope[node[1]] = _eval(node[2], dot, variables, root)
        elif kind == "if":
            for expr, body in node[1]:
                if _truthy(_eval(expr, dot, variables, root)):
                    _run(body, dot, variables, root, out)
                    break
            else:
                _run(node[2], dot, variables, root, out)
        elif kind == "range":
            for i, item in enumerate(_eval(node[3], dot, variables, root)):
                inner = variables.new_child()
                if node[1]:
                    inner[node[1]], inner[node[2]] = i, item
                _run(node[4], item, inner, root, out)


def render_go(template: str, messages: list[dict], prompt: str = "") -> str:
    """Ollama's data: .Messages for chat (and generate, for templates over .Messages); .Prompt for
    templates written for it."""
    data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
            "Prompt": prompt}
    out: list[str] = []
    _run(_parse(_pieces(template)), data, ChainMap(), data, out)
    return "".join(out)


def render_as_ollama(translation, messages: list[dict], runtime_adds_bos: bool) -> str:
    """What Ollama feeds the model: SYSTEM first when the conversation has no system message,
    the Go template's text, BOS in front when the runtime adds it."""
    if translation.default_system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": translation.default_system}] + messages
    text = render_go(ollama.go_template(translation, runtime_adds_bos), messages)
    return (translation.bos if runtime_adds_bos else "") + text


def test_the_renderer_follows_go_trim_and_control_rules():
    t = 'a  {{- range $i, $_ := .Messages }} [{{ $i }}:{{ .Role }}]{{ if eq .Role "x" }}X{{ else if ne .Role "y" }}N{{ else }}Y{{ end }} {{- end }}  {{- "z" -}}  !'
    assert render_go(t, [{"role": "x", "content": ""}, {"role": "y", "content": ""},
                         {"role": "w", "content": ""}]) == "a [0:x]X [1:y]Y [2:w]Nz!"
    assert render_go("{{ len (slice $.Messages 1) }}", [{"role": "a", "content": ""}] * 3) == "2"
    t = '{{ $v := "a" }}{{ range .Messages }}{{ $w := 1 }}{{ $v = .Role }}{{ end }}{{ $v }}'
    assert render_go(t, [{"role": "x", "content": ""}, {"role": "y", "content": ""}]) == "y"


# --- templates to translate ---------------------------------------------------------------------
QWEN25_LIKE = (  # ChatML with a default system prompt, as Qwen 2.5's template (tools left out)
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (  # Meta-Llama-3-8B-Instruct's tokenizer_config.json
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MISTRAL = (  # Mistral-7B-Instruct-v0.2's
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}"
)
GEMMA = (  # a format we do not translate
    "{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\\n' + "
    "message['content'] + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<start_of_turn>model\\n' }}{% endif %}"
)

CONVERSATIONS = list(ollama.PROBES) + [
    [{"role": "user", "content": "Write a haiku.\n\nAbout rain."},
     {"role": "assistant", "content": "Rain taps the window\nquiet streets"},
     {"role": "user", "content": "Another?"},
     {"role": "assistant", "content": "Sure."},
     {"role": "user", "content": "Thanks — 谢谢!"}],
]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    out = {}
    for name, template in {"chatml": None, "qwen25": QWEN25_LIKE, "llama3": LLAMA3,
                           "mistral": MISTRAL, "gemma": GEMMA}.items():
        d = root / name
        d.mkdir()
        if template is None:
            build_tiny_model(d, "qwen2")  # the tiny models' own ChatML template
        else:
            build_tokenizer(d, chat_template=template)
        out[name] = d
    return out


# (template, its format, whether the runtime adds BOS): BOS matters to the templates that write it
CASES = [("chatml", "ChatML", False), ("qwen25", "ChatML", False), ("llama3", "Llama 3", False),
         ("llama3", "Llama 3", True), ("mistral", "Mistral [INST]", False),
         ("mistral", "Mistral [INST]", True)]


@pytest.mark.parametrize("name,fmt,runtime_adds_bos", CASES)
def test_go_template_renders_as_the_jinja_template(tokenizer_dirs, name, fmt, runtime_adds_bos):
    from qlora.models import load_tokenizer

    t = ollama.translate(tokenizer_dirs[name])
    assert t.format.name == fmt
    tok = load_tokenizer(tokenizer_dirs[name])
    tested = 0
    for messages in CONVERSATIONS:
        want = ollama.render_jinja(tok, tok.chat_template, messages)
        if want is None:
            assert name == "mistral" and messages[0]["role"] == "system"  # its template refuses these
            continue
        assert render_as_ollama(t, messages, runtime_adds_bos) == want, messages
        tested += 1
    assert tested == len(CONVERSATIONS) - (2 if name == "mistral" else 0)


def test_default_system_prompt_becomes_the_modelfile_system(tokenizer_dirs):
    t = ollama.translate(tokenizer_dirs["qwen25"])
    assert t.default_system == "You are a helpful assistant."
    assert ollama.translate(tokenizer_dirs["chatml"]).default_system is None


def test_unknown_template_is_refused_naming_it(tokenizer_dirs):
    with pytest.raises(QloraError, match=r"--ollama: the chat template of .*gemma.*<start_of_turn>.*"
                                         r"ChatML, Llama 3, Mistral \[INST\]"):
        ollama.translate(tokenizer_dirs["gemma"])


def test_modelfile_has_template_stops_and_generation_defaults(tmp_path):
    from qlora.export.gguf import export_gguf

    model = build_tiny_model(tmp_path / "m", "qwen2")
    gen = json.loads((model / "generation_config.json").read_text())
    gen.update(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    (model / "generation_config.json").write_text(json.dumps(gen))
    t = ollama.translate(model)
    gguf_file = export_gguf(model, tmp_path / "m.gguf", "f16")
    path = ollama.write_modelfile(t, gguf_file)
    assert path == tmp_path / "m.Modelfile"
    text = path.read_text()
    assert "FROM ./m.gguf\n" in text
    assert f'TEMPLATE """{ollama.go_template(t, runtime_adds_bos=False)}"""' in text
    for line in ('PARAMETER stop "<|im_end|>"', 'PARAMETER stop "</s>"', "PARAMETER temperature 0.7",
                 "PARAMETER top_p 0.8", "PARAMETER top_k 20", "PARAMETER repeat_penalty 1.05"):
        assert line in text.splitlines(), line
    gen["do_sample"] = False  # greedy in Hugging Face: greedy in Ollama
    (model / "generation_config.json").write_text(json.dumps(gen))
    assert ("temperature", 0) in ollama.translate(model).parameters


# --- the adapter's record of training decides the rendering -------------------------------------
BEFORE = (  # the tiny model's Modelfile as written before adapters' records were read
    '# Ollama Modelfile written by qlora export (chat template: ChatML).\n# ollama create NAME -f '
    'm.Modelfile\nFROM ./m.gguf\nTEMPLATE """{{- range $i, $_ := .Messages }}\n{{- $last := eq (len '
    '(slice $.Messages $i)) 1 -}}\n<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ if and $last '
    '(ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}\n{{- end }}"""\nPARAMETER stop "</s>"\n'
    'PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|im_start|>"\n')


def _run_with_record(root, data_format, chat_template=None):
    """A training run's output directory (the adapter's) with its prompt_format.json."""
    from qlora.config import CONFIG_FILE_NAME
    from qlora.train.output import write_prompt_format

    root.mkdir()
    (root / CONFIG_FILE_NAME).write_text("model: m\n")
    write_prompt_format(root, data_format, chat_template)
    return root


def _add_bos_post_processor(model_dir):
    """The tiny tokenizer made to put BOS first (as Llama's does), so training's alpaca prompt has one."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.bos_token_id)])
    tok.save_pretrained(str(model_dir))


@pytest.mark.parametrize("training_bos", [False, True])
def test_alpaca_record_renders_trainings_alpaca_prompt(tmp_path, training_bos):
    from qlora.data import Example, encode_prompt
    from qlora.data.templates import alpaca_prompt
    from qlora.models import load_tokenizer

    model = build_tiny_model(tmp_path / "m", "qwen2")
    if training_bos:
        _add_bos_post_processor(model)
    tok = load_tokenizer(model)
    t = ollama.translate(model, _run_with_record(tmp_path / "run", "alpaca"))
    assert t.format.name == "alpaca prompt" and t.default_system is None
    assert t.stops == ("</s>",) and "alpaca" in t.why
    instruction = "Name a colour.\nOne word."
    want_ids, _ = encode_prompt(Example(format="alpaca", source="t", instruction=instruction, output=""), tok)
    chats = [("", [{"role": "user", "content": instruction}]),  # /api/chat and /api/generate
             ("", [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello."}, {"role": "user", "content": instruction}]),
             (instruction, [])]  # .Prompt alone
    for runtime_adds_bos in (False, True) if training_bos else (False,):
        template = ollama.go_template(t, runtime_adds_bos)
        for prompt, messages in chats:
            text = render_go(template, messages, prompt)
            bos = t.bos if runtime_adds_bos else ""
            assert (bos + text).removeprefix(t.bos) == alpaca_prompt(instruction)
            assert list(tok(bos + text, add_special_tokens=False)["input_ids"]) == want_ids
    assert t.bos == ("<s>" if training_bos else "")


def test_plain_record_is_the_prompt_itself(tmp_path):
    model = build_tiny_model(tmp_path / "m", "qwen2")
    for fmt in ("prompt_completion", "text"):
        t = ollama.translate(model, _run_with_record(tmp_path / fmt, fmt))
        assert ollama.go_template(t, runtime_adds_bos=False) == "{{ .Prompt }}"
        text = ollama.modelfile_text(t, tmp_path / "m.gguf", False)
        assert 'TEMPLATE """{{ .Prompt }}"""' in text.splitlines()
        assert f"# Prompts rendered with plain text, no chat template, as the adapter was trained on {fmt}" \
            in text
        assert t.stops == ("</s>",)
    bare = tmp_path / "bare"  # a model without a chat template: refused without a record only
    bare.mkdir()
    build_tokenizer(bare, chat_template=None)
    assert ollama.translate(bare, tmp_path / "text").format is ollama.PLAIN
    alpaca = ollama.translate(bare, _run_with_record(tmp_path / "alpaca", "alpaca"))
    assert alpaca.format.name == "alpaca prompt"
    with pytest.raises(QloraError, match="has no chat template"):
        ollama.translate(bare)


def test_no_record_or_chat_record_keeps_the_chat_template(tmp_path):
    model = build_tiny_model(tmp_path / "m", "qwen2")
    elsewhere = tmp_path / "adapter"
    elsewhere.mkdir()  # an adapter from outside a qlora run: no record
    for adapter in (None, elsewhere):
        assert ollama.modelfile_text(ollama.translate(model, adapter), tmp_path / "m.gguf", False) == BEFORE
    chat = ollama.translate(model, _run_with_record(tmp_path / "run", "messages"))
    assert chat.format.name == "ChatML" and "the model's own" in chat.why
    text = ollama.modelfile_text(chat, tmp_path / "m.gguf", False)
    assert text.splitlines()[2:] == BEFORE.splitlines()[1:] and "messages data" in text.splitlines()[1]


def test_chat_record_translates_the_recorded_template_option(tmp_path, tokenizer_dirs):
    model = tmp_path / "m"
    model.mkdir()
    build_tokenizer(model, chat_template=LLAMA3)
    t = ollama.translate(model, _run_with_record(tmp_path / "run", "sharegpt", "chatml"))
    assert t.format.name == "ChatML" and "'chatml'" in t.why
    with pytest.raises(QloraError, match=r"chat_template option .*recorded in .*prompt_format.json.*"
                                         r"ChatML, Llama 3"):
        ollama.translate(model, _run_with_record(tmp_path / "run2", "sharegpt", GEMMA))
