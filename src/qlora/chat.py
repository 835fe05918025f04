"""Prompts from conversations, stop tokens, streamed text, and the interactive chat session.

`qlora generate` and `qlora chat` share all of it: a conversation (a list of {role, content})
becomes token ids the way `prompt_rendering` chooses: through a chat template, as training's alpaca
prompt, or as plain text; generation stops at EOS or at the template's end-of-turn token; the new
tokens are decoded incrementally so that a character made of several tokens (UTF-8 bytes split
over byte-level BPE tokens) is printed once it is whole.

Which rendering, first that applies: an explicit --no-chat-template / --chat-template; the record
of the run that trained the adapter (train/output.py's prompt_format.json: its data format, and
for chat data its chat_template option), so that an adapter trained on alpaca or prompt/completion
data is prompted as it was trained (data/templates.py's `encode_prompt`, the renderer `qlora eval`
uses too); else the model's chat template when it has one, plain text when not.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from qlora.errors import QloraError
from qlora.infer import GenerationOptions, stream

# End-of-turn tokens of well-known templates, used when the template's own rendering does not
# show one (e.g. a template that appends it only before the next turn).
KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                     "<|end_of_text|>", "</s>")


# --- prompts ----------------------------------------------------------------------------------
def chat_template_for(tokenizer, chat_template: str | None = None) -> str | None:
    """The Jinja template to render conversations with, or None for plain text: the tokenizer
    has none and none was given (--no-chat-template is `prompt_rendering`'s)."""
    from qlora.data import resolve_chat_template

    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        return None
    return resolve_chat_template(tokenizer, chat_template)


@dataclass(frozen=True)
class PromptRendering:
    """How a conversation becomes tokens: `template` (a chat template), `alpaca` (training's alpaca
    prompt around the last user message), or neither (plain text); `why`, one line for the log."""

    template: str | None = None
    alpaca: bool = False
    why: str = ""


def prompt_rendering(tokenizer, record: dict | None = None, record_path: str | Path | None = None,
                     use_template: bool = True, chat_template: str | None = None) -> PromptRendering:
    """The rendering by the order in the module's docstring. `record` is the training run's
    prompt_format.json (None: no adapter, or one without a record); `use_template` False is
    --no-chat-template, `chat_template` the --chat-template option."""
    if not use_template:
        return PromptRendering(why="plain text (--no-chat-template)")
    if chat_template is not None:
        label = template_option_label(chat_template)
        return PromptRendering(chat_template_for(tokenizer, chat_template),
                               why=f"chat template {label} (--chat-template)")
    if record is not None:
        fmt = record["data_format"]
        trained = f"as the adapter was trained on {fmt} data ({record_path})"
        if record.get("chat_template"):
            option = record.get("chat_template_option")
            template = chat_template_for(tokenizer, option)
            if template is None:  # another --model than the run's, one without a template
                raise QloraError(f"{record_path}: the adapter was trained on {fmt} data with the "
                                 f"model's chat template, and this tokenizer has none; pass "
                                 f"--chat-template (the one training used) or --no-chat-template")
            name = "the model's own" if option is None else template_option_label(option)
            return PromptRendering(template, why=f"chat template, {name}, {trained}")
        if fmt == "alpaca":
            return PromptRendering(alpaca=True, why=f"the alpaca prompt, {trained}")
        return PromptRendering(why=f"plain text, no chat template, {trained}")
    template = chat_template_for(tokenizer)
    if template is None:
        return PromptRendering(why="plain text (the model has no chat template; pass "
                                   "--chat-template chatml to use ChatML)")
    return PromptRendering(template, why="the model's chat template (the default: no record of "
                                         "how an adapter was trained; --no-chat-template for plain text)")


def template_option_label(option: str) -> str:
    """A --chat-template option as a log line names it: short ones quoted, a template string not."""
    return repr(option) if len(option) <= 40 else "given as a template string"


def conversation(prompt: str, system: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": prompt}]


def build_prompt(tokenizer, messages: list[dict], template: str | None, alpaca: bool = False
                 ) -> list[int]:
    """Token ids for the model to continue: the conversation rendered with the template and an
    assistant generation prompt; with `alpaca`, the last user message as training rendered an
    alpaca instruction (up to '### Response:\n'; earlier turns and the system prompt have no place
    in it); without either, the turns' texts joined by blank lines (plain continuation, the
    tokenizer's BOS added as in training on text)."""
    if alpaca:
        from qlora.data import Example, encode_prompt

        user = [m["content"] for m in messages if m["role"] == "user"]
        ids, _ = encode_prompt(Example(format="alpaca", source="prompt", instruction=user[-1],
                                       output=""), tokenizer)
        return ids
    if template is not None:
        from jinja2 import TemplateError

        try:
            text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
        except TemplateError as err:
            raise QloraError(f"the chat template refused this conversation: {err} (some templates "
                             "take no system message or need alternating roles: drop --system, "
                             "or pass --chat-template chatml / --no-chat-template)") from err
        # the template writes BOS itself when the model wants one
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "\n\n".join(m["content"] for m in messages)
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def stop_token_ids(tokenizer, model_dir: str | Path | None = None, template: str | None = None
                   ) -> tuple[int, ...]:
    """EOS of the tokenizer, config.json and generation_config.json, plus the template's
    end-of-turn token (found by rendering a one-turn exchange and taking the special token that
    follows the assistant's words)."""
    ids: list[int] = []

    def add(value):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)

    add(tokenizer.eos_token_id)
    if model_dir is not None:
        import json

        from qlora.models import load_generation_config

        add(load_generation_config(model_dir).get("eos_token_id"))
        config = Path(model_dir) / "config.json"
        if config.exists():
            add(json.loads(config.read_text()).get("eos_token_id"))
    if template is not None:
        add(end_of_turn_id(tokenizer, template))
        for name in KNOWN_END_OF_TURN:
            if name in template:
                tid = tokenizer.convert_tokens_to_ids(name)
                if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                    add(tid)
    return tuple(ids)


def end_of_turn_id(tokenizer, template: str) -> int | None:
    marker = "qlora-end-of-turn-probe"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
            chat_template=template, tokenize=False)
    except Exception:  # noqa: BLE001 - a template may refuse this exchange; then the names decide
        return None
    end = text.find(marker)
    if end < 0:
        return None
    end += len(marker)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    special = set(tokenizer.all_special_ids)
    for tid, (s, _) in zip(enc["input_ids"], enc["offset_mapping"]):
        if s >= end:
            return tid if tid in special or _is_added_special(tokenizer, tid) else None
    return None


def _is_added_special(tokenizer, tid: int) -> bool:
    tok = (getattr(tokenizer, "added_tokens_decoder", {}) or {}).get(tid)
    return bool(tok is not None and getattr(tok, "special", False))


# --- streamed text ----------------------------------------------------------------------------
class TextStream:
    """Token ids in, text pieces out, as soon as they are whole.

    Decoding token by token breaks characters split over tokens (UTF-8 bytes) and the spaces
    SentencePiece tokenizers attach to a word. So we decode a short window of recent tokens twice,
    with and without the new ones, and emit the difference once it does not end in the
    replacement character U+FFFD (a character still waiting for its other bytes)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded for context
        self.read = 0  # tokens up to here have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """What is left at the end (an incomplete character prints as U+FFFD)."""
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]


def stream_reply(model, tokenizer, prompt_ids: list[int], opts: GenerationOptions,
                 write: Callable[[str], None] | None = None) -> tuple[list[int], str]:
    """Generate from prompt_ids, writing text pieces as they come; (new ids, text). A stop token
    ends the reply and is kept in the ids but not in the text."""
    was_training = model.training
    model.eval()
    out = TextStream(tokenizer)
    ids, pieces = [], []
    stops = set(opts.eos_token_ids)
    try:
        for tid in stream(model, prompt_ids, opts):
            ids.append(tid)
            if tid in stops:
                break
            piece = out.push(tid)
            if piece:
                pieces.append(piece)
                if write is not None:
                    write(piece)
    finally:
        model.train(was_training)
    tail = out.flush()
    if tail:
        pieces.append(tail)
        if write is not None:
            write(tail)
    return ids, "".join(pieces)


def fit_max_new_tokens(n_prompt: int, opts: GenerationOptions, context: int, what: str
                       ) -> tuple[GenerationOptions, str | None]:
    """opts whose max_new_tokens fits the context after an n_prompt-token prompt, and a note
    when it had to shrink. A prompt that leaves no room at all is refused (QloraError)."""
    from dataclasses import replace

    if n_prompt >= context:
        raise QloraError(f"{what} is {n_prompt} tokens, but the model's context "
                         f"(max_position_embeddings) is {context} tokens: shorten it to at most "
                         f"{context - 1} tokens, leaving room for the answer")
    room = context - n_prompt
    if opts.max_new_tokens <= room:
        return opts, None
    return (replace(opts, max_new_tokens=room),
            f"{what} is {n_prompt} tokens: only {room} new tokens fit the model's context of "
            f"{context} (max_new_tokens was {opts.max_new_tokens})")


def empty_answer_note(new_ids: list[int], text: str, opts: GenerationOptions) -> str | None:
    """Why an answer printed empty, when its first token was a stop token; else None."""
    if text.strip() or not new_ids or new_ids[0] not in set(opts.eos_token_ids):
        return None
    note = "the answer is empty: the model produced its end-of-turn token first"
    if opts.temperature == 0:
        note += (" (greedy decoding gives the same for this prompt; an adapter trained on this "
                 "format, another prompt or --temperature 0.7 may answer)")
    return note


# --- `qlora generate` --------------------------------------------------------------------------
def read_prompts_file(path: str | Path) -> list[str]:
    """Prompts of a file: JSONL (.jsonl, or every line a JSON object) with a "prompt" field,
    else one prompt per line. Blank lines are skipped."""
    import json

    p = Path(path)
    if not p.is_file():
        raise QloraError(f"prompts file {path} not found")
    from qlora.data.formats import read_utf8

    lines = [(i, line) for i, line in enumerate(read_utf8(p, "prompts file ").splitlines(), 1)
             if line.strip()]
    if not lines:
        raise QloraError(f"prompts file {path} has no prompts (it is empty)")
    as_json = p.suffix == ".jsonl" or all(line.lstrip().startswith("{") for _, line in lines)
    if not as_json:
        return [line for _, line in lines]
    prompts = []
    for i, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise QloraError(f"{path} line {i}: not valid JSON ({e.msg}); a .jsonl prompts file "
                             f'holds one object per line like {{"prompt": "..."}}') from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise QloraError(f'{path} line {i}: no "prompt" string field; a .jsonl prompts file '
                             f'holds one object per line like {{"prompt": "..."}}')
        prompts.append(row["prompt"])
    return prompts


def generate_all(model, tokenizer, prompts: list[str], template: str | None, system: str | None,
                 opts: GenerationOptions, context: int, out: TextIO | None = None,
                 err: TextIO | None = None, alpaca: bool = False) -> list[list[int]]:
    """Answer each prompt in turn, streaming the text to `out` (a header line before each when
    there are several); the new token ids of each. A prompt longer than the context is refused
    before anything is generated. `template` / `alpaca`: the PromptRendering's."""
    out = out or sys.stdout
    err = err or sys.stderr
    encoded = []
    for k, prompt in enumerate(prompts, 1):
        ids = build_prompt(tokenizer, conversation(prompt, system), template, alpaca)
        what = f"prompt {k}" if len(prompts) > 1 else "the prompt"
        fitted, note = fit_max_new_tokens(len(ids), opts, context, what)
        if note:
            err.write(f"note: {note}\n")
        encoded.append((ids, fitted))
    results = []
    for k, (prompt, (ids, fitted)) in enumerate(zip(prompts, encoded), 1):
        if len(prompts) > 1:
            head = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            sep = "" if k == 1 else "\n"
            out.write(f"{sep}### [{k}/{len(prompts)}] {head}\n")

        def write(piece: str) -> None:
            out.write(piece)
            out.flush()

        new_ids, text = stream_reply(model, tokenizer, ids, fitted, write)
        out.write("\n")
        out.flush()
        why = empty_answer_note(new_ids, text, fitted)
        if why:
            err.write(f"note: {'prompt ' + str(k) + ': ' if len(prompts) > 1 else ''}{why}\n")
            err.flush()
        results.append(new_ids)
    return results


# --- the chat session -------------------------------------------------------------------------
@dataclass
class ChatSession:
    """A conversation with a model: history, system prompt, and trimming to the context.

    Each turn renders the whole conversation again (the template decides how earlier turns look)
    and generates with a fresh KV cache; for terminal-sized chats the prompt pass is cheap next
    to the token-by-token generation."""

    model: object
    tokenizer: object
    template: str | None
    opts: GenerationOptions
    system: str | None = None
    context: int = 4096
    history: list[dict] = field(default_factory=list)  # user/assistant turns, no system
    last_ids: list[int] = field(default_factory=list)  # the token ids of the last answer
    alpaca: bool = False  # each message as an alpaca instruction on its own (PromptRendering)

    def messages(self, history: list[dict] | None = None, new: list[dict] | None = None) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + (self.history if history is None else history) + (new or [])

    def reset(self) -> None:
        self.history.clear()

    def prepare(self, user_text: str) -> tuple[list[int], GenerationOptions, list[str]]:
        """Prompt ids for the next turn, the options to generate it with, and notes for the
        user (dropped turns, a shortened answer). Oldest turns go first, a user+assistant pair at
        a time, until the prompt plus max_new_tokens fits the context. A message too long for the
        context on its own is refused (QloraError) and the history is left as it was."""
        new = [{"role": "user", "content": user_text}]
        history = list(self.history)
        dropped = 0
        while True:
            ids = build_prompt(self.tokenizer, self.messages(history, new), self.template, self.alpaca)
            if len(ids) + self.opts.max_new_tokens <= self.context or not history:
                break
            history = history[2:]
            dropped += 1
        if len(ids) >= self.context:
            raise QloraError(
                f"your message is too long: with the system prompt and template it is {len(ids)} "
                f"tokens, and the model's context (max_position_embeddings) is {self.context} "
                f"tokens; shorten it (nothing was sent, the conversation is unchanged)")
        notes = []
        if dropped:
            notes.append(f"[the conversation no longer fits the model's context of {self.context} "
                         f"tokens: dropped the oldest {dropped} exchange{'s' if dropped > 1 else ''}]")
        opts, note = fit_max_new_tokens(len(ids), self.opts, self.context, "the conversation")
        if note:
            notes.append(f"[{note}]")
        self.history = history
        return ids, opts, notes

    def answer(self, user_text: str, ids: list[int], opts: GenerationOptions,
               write: Callable[[str], None] | None = None) -> str:
        """Generate the reply to a prepared turn (streamed through `write`); keep both turns."""
        self.last_ids, text = stream_reply(self.model, self.tokenizer, ids, opts, write)
        self.history += [{"role": "user", "content": user_text},
                         {"role": "assistant", "content": text.strip()}]
        return text

    def reply(self, user_text: str, write: Callable[[str], None] | None = None) -> str:
        ids, opts, _ = self.prepare(user_text)
        return self.answer(user_text, ids, opts, write)


HELP = "commands: /reset clears the conversation, /exit (or Ctrl-D) leaves"


def _lines(stdin: TextIO, out: TextIO, prompt: str) -> Iterable[str]:
    """User messages, one per line; from a terminal through input() (line editing)."""
    interactive = stdin.isatty() and stdin is sys.stdin
    if interactive:
        try:
            import readline  # noqa: F401 - gives input() history and editing
        except ImportError:
            pass
    while True:
        if interactive:
            try:
                line = input(prompt)
            except EOFError:
                out.write("\n")
                return
        else:
            out.write(prompt)
            out.flush()
            line = stdin.readline()
            if not line:
                out.write("\n")
                return
            out.write(line if line.endswith("\n") else line + "\n")  # echo piped input
        yield line.rstrip("\n")


def run_chat(session: ChatSession, stdin: TextIO | None = None, out: TextIO | None = None) -> None:
    """The terminal loop: read a line, answer it, until /exit or end of input."""
    stdin = stdin or sys.stdin
    out = out or sys.stdout

    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    def note(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    note(HELP)
    for line in _lines(stdin, out, "you> "):
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            note("[conversation cleared]")
            continue
        if text.startswith("/") and text.split()[0] in ("/help", "/?"):
            note(HELP)
            continue
        try:
            ids, opts, notes = session.prepare(text)
        except QloraError as e:
            note(f"[{e}]")
            continue
        for n in notes:
            note(n)
        write("assistant> ")
        try:
            reply = session.answer(text, ids, opts, write)
        except KeyboardInterrupt:
            write("\n[interrupted: this exchange was not kept]")
            reply = None
        write("\n")
        why = None if reply is None else empty_answer_note(session.last_ids, reply, opts)
        if why:
            note(f"[{why}]")
