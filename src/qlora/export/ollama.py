"""`qlora export --ollama`: a Modelfile beside the GGUF, with the chat template in Ollama's syntax.

Ollama does not run Jinja: its TEMPLATE is a Go text/template over `.Messages` (each with `.Role`
and `.Content`). We do not parse the model's Jinja template. We recognise it by what it renders:
a few probe conversations (with and without a system turn, one and several exchanges) are rendered
by the model's own template (transformers' apply_chat_template) and by each format we can translate
— ChatML (Qwen, our tiny models), Llama 3, Mistral [INST] — and the format that renders every probe
identically is the one written out. Anything else is refused, naming the template, before the
export starts: a Modelfile whose prompts differ from training is worse than none.

What the Go templates rely on, and how the Modelfile closes the gaps:
- a default system prompt (Qwen 2.5 writes one when the conversation has none) becomes the
  Modelfile's SYSTEM, which Ollama puts first when a request has no system message;
- the BOS token some templates write first is left to the runtime when the GGUF says to add BOS
  (tokenizer.ggml.add_bos_token), else written into the template;
- Llama 3's template trims each message; Ollama passes messages as given (the same text for
  messages without surrounding white space);
- stop: the end-of-turn tokens (those qlora.chat stops on) and the format's turn markers;
- PARAMETER temperature / top_p / top_k / repeat_penalty from generation_config.json where set
  (do_sample false means greedy: temperature 0).

An exported adapter is prompted as it was trained, as `qlora generate` does (chat.py's
`prompt_rendering`): the record of its training run (train/output.py's prompt_format.json) decides.
Chat data: its chat template (the run's chat_template option when one was given), translated as
above. Alpaca data: a Go template writing training's alpaca prompt (data/templates.py's
`alpaca_prompt`, the text `encode_prompt` tokenizes) around `.Prompt`, or around the last user
message of `.Messages`; stop: EOS. Prompt/completion or text data: `{{ .Prompt }}`. No adapter, or
no record: the model's chat template, as above. The Modelfile's header says which and why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qlora.errors import QloraError


@dataclass(frozen=True)
class Format:
    name: str
    go_template: str  # {bos} and {eos} are filled in when written
    markers: tuple[str, ...]  # turn markers a runaway answer would print: extra stops
    system_open: str | None  # how a system turn starts (to read a default system prompt)
    system_close: str | None

    def render(self, messages: list[dict], bos: str, eos: str) -> str:
        """The text this format gives a conversation ending with a user turn, plus the opening of
        the assistant's answer (what Ollama feeds the model)."""
        return RENDERERS[self.name](messages, bos, eos)


def _chatml(messages, bos, eos):
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def _llama3(messages, bos, eos):
    turns = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
                    for m in messages)
    return bos + turns + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _mistral(messages, bos, eos):
    out = [bos]
    for m in messages:
        out.append(f"[INST] {m['content']} [/INST]" if m["role"] == "user" else m["content"] + eos)
    return "".join(out)


RENDERERS = {"ChatML": _chatml, "Llama 3": _llama3, "Mistral [INST]": _mistral}

CHATML = Format("ChatML", (
    "{{- range $i, $_ := .Messages }}\n"
    "{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
    "<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    '{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant\n'
    "{{ end }}\n"
    "{{- end }}"), ("<|im_start|>", "<|im_end|>"), "<|im_start|>system\n", "<|im_end|>\n")

LLAMA3 = Format("Llama 3", (
    "{bos}"
    "{{- range $i, $_ := .Messages }}\n"
    "{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
    "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>\n"
    '{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>\n\n'
    "{{ end }}\n"
    "{{- end }}"), ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>")

MISTRAL = Format("Mistral [INST]", (
    "{bos}"
    "{{- range .Messages }}\n"
    '{{- if eq .Role "user" }}[INST] {{ .Content }} [/INST]\n'
    '{{- else if eq .Role "assistant" }}{{ .Content }}{eos}\n'
    "{{- end }}\n"
    "{{- end }}"), ("[INST]", "[/INST]"), None, None)

FORMATS = (CHATML, LLAMA3, MISTRAL)


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def _system(text):
    return {"role": "system", "content": text}


# every conversation ends with a user turn (Ollama then opens the assistant's); contents carry no
# surrounding white space (see the module docstring on Llama 3's trim)
PROBES = (
    [_user("Hello!")],
    [_user("What is 2 + 2?\nAnswer briefly."), _assistant("4."), _user("And 3 + 3?")],
    [_system("You are terse."), _user("Hello!")],
    [_system("You are terse."), _user("Hi"), _assistant("Hello."), _user("Bye")],
)


@dataclass(frozen=True)
class Translation:
    """What the Modelfile needs from the model directory, known before the export starts."""

    format: Format
    default_system: str | None
    bos: str
    eos: str
    stops: tuple[str, ...]
    parameters: tuple[tuple[str, object], ...]
    why: str | None = None  # from the adapter's record: which rendering and why (None: no record)


def render_jinja(tokenizer, template: str, messages: list[dict]) -> str | None:
    """The model's own rendering with the assistant's opening; None when the template refuses
    the conversation (e.g. Mistral's has no system role)."""
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - jinja's raise_exception and template errors alike
        return None


def _default_system(fmt: Format, jinja_text: str, messages: list[dict], bos: str, eos: str) -> str | None:
    """The system prompt the template adds to a conversation without one, if it does."""
    if fmt.system_open is None or any(m["role"] == "system" for m in messages):
        return None
    start = (bos if jinja_text.startswith(bos) and bos else "") + fmt.system_open
    if not jinja_text.startswith(start) or fmt.system_close not in jinja_text[len(start):]:
        return None
    return jinja_text[len(start):jinja_text.index(fmt.system_close, len(start))]


def matches(fmt: Format, tokenizer, template: str) -> tuple[bool, str | None]:
    """(whether fmt renders every probe the template accepts as the template does, the default
    system prompt the template adds). Conversations without a system turn must be accepted."""
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    default = None
    for probe in PROBES:
        text = render_jinja(tokenizer, template, probe)
        if text is None:
            if any(m["role"] == "system" for m in probe):
                continue
            return False, None
        if default is None:
            default = _default_system(fmt, text, probe, bos, eos)
        with_default = probe if default is None or probe[0]["role"] == "system" else [_system(default)] + probe
        if fmt.render(with_default, bos, eos) != text:
            return False, None
    return True, default


def _template_name(model_dir: Path, template: str) -> str:
    source = next((f for f in ("chat_template.jinja", "tokenizer_config.json") if (model_dir / f).exists()),
                  "tokenizer")
    head = " ".join(template.split())[:80]
    return f"{model_dir / source} ({head!r}…)"


def generation_parameters(model_dir: Path) -> tuple[tuple[str, object], ...]:
    """Ollama PARAMETERs from generation_config.json, where set."""
    from qlora.models import load_generation_config

    gen = load_generation_config(model_dir)
    out = []
    if gen.get("do_sample") is False:
        out.append(("temperature", 0))  # Hugging Face decodes greedily whatever the temperature
    elif "temperature" in gen:
        out.append(("temperature", gen["temperature"]))
    for hf, ollama in (("top_p", "top_p"), ("top_k", "top_k"), ("repetition_penalty", "repeat_penalty")):
        if gen.get(hf) is not None:
            out.append((ollama, gen[hf]))
    return tuple(out)


def translate(model_dir: str | Path, adapter_dir: str | Path | None = None) -> Translation:
    """How Ollama should render prompts for the model (with the adapter): by the adapter's record
    of training, else the model's chat template (see the module docstring). QloraError naming the
    template when it is none of the formats we translate (or there is none)."""
    from qlora.models import load_tokenizer
    from qlora.train.output import read_prompt_format

    model_dir = Path(model_dir)
    tokenizer = load_tokenizer(model_dir)
    record, record_path = read_prompt_format(adapter_dir) or (None, None)
    if record is None:
        return _translate_chat(model_dir, tokenizer, getattr(tokenizer, "chat_template", None))
    fmt = record["data_format"]
    trained = f"as the adapter was trained on {fmt} data ({record_path})"
    if record.get("chat_template"):
        return _translate_recorded_chat(model_dir, tokenizer, record.get("chat_template_option"),
                                        record_path, trained)
    stops = _stops(tokenizer, model_dir, None, ())
    bos = _training_bos(tokenizer)
    rendering, why = ((alpaca_format(), f"the alpaca prompt, {trained}") if fmt == "alpaca" else
                      (PLAIN, f"plain text, no chat template, {trained}"))
    return Translation(rendering, None, bos, tokenizer.eos_token or "", stops,
                       generation_parameters(model_dir), why)


def _translate_chat(model_dir: Path, tokenizer, template, why: str | None = None,
                    source: str | None = None) -> Translation:
    if not isinstance(template, str):
        raise QloraError(f"--ollama: {model_dir} has no chat template to translate; add one to "
                         f"tokenizer_config.json, or export without --ollama")
    for fmt in FORMATS:
        ok, default = matches(fmt, tokenizer, template)
        if ok:
            stops = _stops(tokenizer, model_dir, template, fmt.markers)
            return Translation(fmt, default, tokenizer.bos_token or "", tokenizer.eos_token or "", stops,
                               generation_parameters(model_dir), why)
    names = ", ".join(f.name for f in FORMATS)
    raise QloraError(f"--ollama: the chat template of {source or _template_name(model_dir, template)} "
                     f"renders conversations unlike every format we translate to Ollama's template "
                     f"syntax ({names}); export without --ollama and write the Modelfile's TEMPLATE "
                     f"by hand")


def _translate_recorded_chat(model_dir: Path, tokenizer, option: str | None, record_path: Path,
                             trained: str) -> Translation:
    """The chat template the adapter was trained with: the tokenizer's own, or the run's
    chat_template option (a name, a file or a template string)."""
    from qlora.chat import chat_template_for, template_option_label

    template = chat_template_for(tokenizer, option)
    if template is None:  # another --model than the run's, one without a template
        raise QloraError(f"--ollama: {record_path}: the adapter was trained on chat data with the "
                         f"model's chat template, and {model_dir} has none; export without --ollama")
    if option is None or template == getattr(tokenizer, "chat_template", None):
        return _translate_chat(model_dir, tokenizer, template, f"chat template, the model's own, {trained}")
    label = template_option_label(option)
    return _translate_chat(model_dir, tokenizer, template, f"chat template, {label}, {trained}",
                           source=f"chat_template option {label} recorded in {record_path}")


def _stops(tokenizer, model_dir: Path, template: str | None, markers: tuple[str, ...]) -> tuple[str, ...]:
    """The end-of-turn tokens qlora.chat stops on (EOS alone without a template), then the markers."""
    from qlora.chat import stop_token_ids

    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer, model_dir, template)]
    return tuple(dict.fromkeys([s for s in stops if s] + list(markers)))


def _training_bos(tokenizer) -> str:
    """The BOS token training put before an alpaca or plain prompt: the tokenizer's own
    (add_special_tokens=True, as encode_prompt tokenizes), or "" when it adds none."""
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    bos_id = tokenizer.bos_token_id
    return tokenizer.bos_token if bos_id is not None and ids and ids[0] == bos_id else ""


PLAIN = Format("plain text", "{bos}{{ .Prompt }}", (), None, None)


def alpaca_format() -> Format:
    """Training's alpaca prompt (without input: Ollama has one prompt field) as a Go template,
    built from data/templates.py's `alpaca_prompt` so the wording cannot drift: `.Prompt`, or the
    last user message of `.Messages` (earlier turns and system prompts have no place in it, as in
    `qlora generate`), as the instruction."""
    from qlora.data.templates import alpaca_prompt

    slot = "\x00instruction\x00"
    head, tail = alpaca_prompt(slot).split(slot)
    if "{{" in head + tail or "}}" in head + tail:
        raise QloraError("--ollama: the alpaca prompt holds {{ or }}, which Go templates read as actions")
    go = ("{bos}{{- $prompt := .Prompt }}"
          '{{- range .Messages }}{{- if eq .Role "user" }}{{- $prompt = .Content }}{{- end }}{{- end }}'
          f"{head}{{{{ $prompt }}}}{tail}")
    return Format("alpaca prompt", go, (), None, None)


def go_template(t: Translation, runtime_adds_bos: bool) -> str:
    """The TEMPLATE text: the format's, with BOS left to the runtime when it adds one."""
    return (t.format.go_template.replace("{bos}", "" if runtime_adds_bos else t.bos)
            .replace("{eos}", t.eos))


def modelfile_path(gguf_file: Path) -> Path:
    return gguf_file.with_suffix(".Modelfile")


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def modelfile_text(t: Translation, gguf_file: Path, runtime_adds_bos: bool) -> str:
    template = go_template(t, runtime_adds_bos)
    if '"""' in template or (t.default_system and '"""' in t.default_system):
        raise QloraError('--ollama: the template holds """, which a Modelfile cannot quote')
    kind = "chat template" if t.format in FORMATS else "prompt"
    lines = [f"# Ollama Modelfile written by qlora export ({kind}: {t.format.name})."]
    if t.why is not None:
        lines.append(f"# Prompts rendered with {t.why}.")
    lines += [f"# ollama create NAME -f {modelfile_path(gguf_file).name}",
              f"FROM ./{gguf_file.name}",
              f'TEMPLATE """{template}"""']
    if t.default_system is not None:
        lines.append(f'SYSTEM """{t.default_system}"""')
    lines += [f"PARAMETER stop {_quote(s)}" for s in t.stops]
    lines += [f"PARAMETER {name} {value}" for name, value in t.parameters]
    return "\n".join(lines) + "\n"


def gguf_adds_bos(gguf_file: Path) -> bool:
    import gguf

    field = gguf.GGUFReader(str(gguf_file)).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field.contents()) if field is not None else False


def write_modelfile(t: Translation, gguf_file: str | Path) -> Path:
    """Write NAME.Modelfile beside NAME.gguf (atomically); return its path."""
    from qlora.files import staged_file

    gguf_file = Path(gguf_file)
    path = modelfile_path(gguf_file)
    text = modelfile_text(t, gguf_file, gguf_adds_bos(gguf_file))
    with staged_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
