"""`qlora export --check` and `qlora merge`'s check: run the output and the trained model on the
same held-out tokens and compare (the comparison itself is export/parity.py).

Reference: base + adapter in our engine (export/reference.py says which base). Other side:
- a GGUF file in llama.cpp, through llama-cpp-python in a subprocess (llamacpp_worker.py; any
  python that imports llama_cpp: this one, --llama-python or $QLORA_LLAMA_PYTHON);
- or, with engine "qlora", the GGUF's tensors dequantized by the gguf package and run by our own
  decoder: no llama.cpp needed; this isolates the file's contents (names, permutation, types,
  tokenizer metadata, template) from llama.cpp's arithmetic;
- a merged checkpoint loaded back by our engine.
The models run one after the other (never two in memory); logits go through a temp directory.

Held-out data, first found: --check-data FILE; the validation data of the training run that wrote
the adapter (run_config.yaml beside it: val_data, or the val_set_size split of data, as training
drew it); its training data (then not held out, and said so); a short built-in text.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qlora.errors import QloraError
from qlora.export import parity
from qlora.files import check_readable

DEFAULT_SAMPLES = 8
MAX_TOKENS = 256  # per held-out example
CHAT_TOKENS = 48  # the chat reply's budget
BUILTIN_TEXT = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins "
                "with a single step. Water boils at one hundred degrees Celsius at sea level.")
BUILTIN_CHAT = [{"role": "user", "content": "Hello! Who are you?"}]
LLAMA_HINT = ("pip install llama-cpp-python (or pass --llama-python PATH of a python that has it, "
              "or --check-engine qlora for the check without llama.cpp)")


class ReferenceUnavailable(QloraError):
    """Our engine cannot run base + adapter (an adapter feature it lacks): nothing to compare with."""


@dataclass
class Sample:
    ids: list[int]
    labels: list[int]
    messages: list[dict] | None = None

    def positions(self) -> np.ndarray:
        """Positions whose next token has a label: where the logits are compared."""
        return np.array([p for p in range(len(self.ids) - 1) if self.labels[p + 1] != -100], dtype=np.int64)

    def targets(self) -> np.ndarray:
        return np.array(self.ids, dtype=np.int64)[self.positions() + 1]


# --- held-out samples ---------------------------------------------------------------------------
def find_run_config(adapter_dir: str | Path | None) -> Path | None:
    """run_config.yaml of the training run that wrote the adapter (train/output.find_run_dir)."""
    from qlora.config import CONFIG_FILE_NAME
    from qlora.train.output import find_run_dir

    run_dir = find_run_dir(adapter_dir)
    return None if run_dir is None else run_dir / CONFIG_FILE_NAME


def _chat_messages(example) -> list[dict] | None:
    """The conversation to answer for one example: a chat's turns before its last answer, the
    instruction or prompt as a user turn, none for plain text."""
    if example.messages:
        last = max((i for i, m in enumerate(example.messages) if m["role"] == "assistant"), default=None)
        return example.messages[:last] if last else None
    if example.instruction:
        text = example.instruction + (f"\n\n{example.input}" if example.input else "")
        return [{"role": "user", "content": text}]
    if example.prompt:
        return [{"role": "user", "content": example.prompt.strip()}]
    return None


def samples_from_file(path: str | Path, tokenizer, n: int, chat_template: str | None = None) -> list[Sample]:
    from jinja2 import TemplateError

    from qlora.data import encode_example, load_examples
    from qlora.export.imatrix import spread

    examples, _ = load_examples(str(path))
    out = []
    for i in spread(len(examples), n):
        try:
            enc = encode_example(examples[i], tokenizer, "responses", chat_template)
        except (QloraError, TemplateError):  # an example training would skip too
            continue
        sample = Sample(enc["input_ids"][:MAX_TOKENS], enc["labels"][:MAX_TOKENS], _chat_messages(examples[i]))
        if len(sample.positions()):
            out.append(sample)
    if not out:
        raise QloraError(f"--check-data {path}: no example with response tokens to compare on")
    return out


def samples_of_run(run_config: Path, tokenizer, n: int) -> tuple[list[Sample], str]:
    """The run's held-out examples (its val_data, or its val_set_size split as training drew it);
    its training data when it held none out."""
    from qlora.config import load_config
    from qlora.export.imatrix import spread
    from qlora.train.data import load_data

    cfg = load_config(str(run_config), {})
    if cfg.val_data:
        return (samples_from_file(cfg.val_data, tokenizer, n, cfg.chat_template),
                f"{cfg.val_data} (the run's held-out val_data)")
    if cfg.val_set_size:
        _, val, _ = load_data(cfg, tokenizer, log=lambda _line: None)
        picked = [val[i] for i in spread(len(val), n)]
        return ([Sample(e["input_ids"][:MAX_TOKENS], e["labels"][:MAX_TOKENS]) for e in picked],
                f"the run's held-out validation split of {cfg.data}")
    return (samples_from_file(cfg.data, tokenizer, n, cfg.chat_template),
            f"{cfg.data} (the run held none out: these were trained on)")


def builtin_samples(tokenizer) -> list[Sample]:
    ids = list(tokenizer(BUILTIN_TEXT, add_special_tokens=True)["input_ids"])[:MAX_TOKENS]
    return [Sample(ids, [-100] + ids[1:])]


def check_samples(tokenizer, data: str | Path | None, adapter_dir, n: int,
                  log: Callable[[str], None]) -> tuple[list[Sample], str]:
    """(samples, where they come from), by the order in the module's docstring."""
    if n < 1:
        raise QloraError(f"--check-samples {n}: give at least 1")
    if data is not None:
        check_readable(data, "--check-data")
        return samples_from_file(data, tokenizer, n), str(data)
    run_config = find_run_config(adapter_dir)
    if run_config is not None:
        try:
            return samples_of_run(run_config, tokenizer, n)
        except (QloraError, OSError) as err:
            log(f"note: the check cannot read the training run's data ({err}); using a built-in text")
    return builtin_samples(tokenizer), "a built-in text (pass --check-data FILE to use your own)"


def chat_messages(samples: list[Sample]) -> list[dict]:
    return next((s.messages for s in samples if s.messages), BUILTIN_CHAT)


# --- running models -----------------------------------------------------------------------------
def logits_at_positions(model, samples: list[Sample], work: Path, prefix: str) -> list[Path]:
    """Each sample's logits at its compared positions, saved as float32 .npy files."""
    import torch

    from qlora.export.reference import StreamedReference
    from qlora.models.decoder import compute_device

    if isinstance(model, StreamedReference):
        return streamed_run(model, samples, None, [], work, prefix)[0]
    device = compute_device(model)
    with torch.no_grad():
        return save_logits(samples, (model(torch.tensor([s.ids], device=device)) for s in samples),
                           work, prefix)


def save_logits(samples: list[Sample], each_logits, work: Path, prefix: str) -> list[Path]:
    """Save each sample's logits (from `each_logits`, [1, T, V] in sample order) at its compared
    positions; one sample's logits alive at a time."""
    paths = []
    for i, (s, logits) in enumerate(zip(samples, each_logits)):
        logits = logits[0].float().cpu().numpy()
        paths.append(work / f"{prefix}-{i}.npy")
        np.save(paths[-1], logits[s.positions()])
        del logits  # before the next sample's
    return paths


@dataclass
class ChatTurn:
    """The check's chat turn as the reference renders it."""
    messages: list[dict]
    template: str
    stops: tuple[int, ...]  # the end-of-turn tokens (chat.stop_token_ids)
    text: str
    prompt_ids: list[int]

    def result(self, reply: list[int]) -> dict:
        """{text, prompt_ids, reply_ids, stopped_on}: what parity.compare_chat takes."""
        stopped = reply[-1] if reply and reply[-1] in self.stops else None
        return {"text": self.text, "prompt_ids": self.prompt_ids, "reply_ids": reply,
                "stopped_on": stopped}


def chat_turn(tokenizer, template: str, messages: list[dict], stops: tuple[int, ...]) -> ChatTurn:
    """The conversation rendered for the assistant's answer, with its token ids."""
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=True)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ChatTurn(messages, template, stops, text, ids)


def reference_chat_turn(tokenizer, model_dir, samples: list[Sample]) -> ChatTurn | None:
    """The chat turn the check runs, or None where the tokenizer has no chat template."""
    from qlora.chat import chat_template_for, stop_token_ids

    template = chat_template_for(tokenizer)  # None where the tokenizer has none
    if template is None:
        return None
    messages = chat_messages(samples)
    return chat_turn(tokenizer, template, messages, stop_token_ids(tokenizer, model_dir, template))


def greedy_chat(model, turn: ChatTurn) -> dict:
    """One greedy answer in our engine to the turn's prompt: {text, prompt_ids, reply_ids, stopped_on}."""
    from qlora.infer import GenerationOptions, generate

    reply = generate(model, turn.prompt_ids,
                     GenerationOptions(max_new_tokens=CHAT_TOKENS, eos_token_ids=turn.stops))
    return turn.result(reply)


def streamed_run(model, samples: list[Sample], turn: ChatTurn | None, other_reply: list[int],
                 work: Path, prefix: str) -> tuple[list[Path], dict | None]:
    """(logit files, chat turn or None) of a StreamedReference, from one pass over the samples
    and, for the chat turn, the prompt followed by the other model's reply (`other_reply`)."""
    import torch

    sequences = [torch.tensor([s.ids]) for s in samples]
    caches: list = [None] * len(samples)
    forced = []
    if turn is not None:
        forced = turn.prompt_ids + list(other_reply)[:CHAT_TOKENS]
        sequences.append(torch.tensor([forced]))
        caches.append(model.new_cache(1, len(turn.prompt_ids) + CHAT_TOKENS))
    hidden = model.hidden_states(sequences, caches)
    paths = save_logits(samples, (model.logits(h) for h in hidden), work, prefix)
    if turn is None:
        return paths, None
    reply = forced_greedy_reply(model, model.logits(hidden[-1])[0, len(turn.prompt_ids) - 1:],
                                caches[-1], turn, other_reply)
    return paths, turn.result(reply)


def forced_greedy_reply(model, logits, cache, turn: ChatTurn, other_reply: list[int]) -> list[int]:
    """The reference's greedy reply, read off its logits over the other model's reply where the
    two agree: `logits` [len(other_reply) + 1, V], those of the prompt's last position and of
    each forced reply token; `cache` holds the forced tokens' keys and values. Up to the first
    token where the reference picks otherwise it generated the other's tokens; from there on
    (or where the other's reply ends) it generates on, a streamed pass a token, from the cache
    cut back to what it would have seen. Greedy decoding's tokens, but for a near-tie that the
    rounding of a whole-sequence pass, against a token-by-token one, may tip."""
    import torch

    reply: list[int] = []
    for j, pick in enumerate(logits.argmax(-1).tolist()):
        reply.append(pick)
        if pick in turn.stops or len(reply) == CHAT_TOKENS:
            return reply
        if j >= len(other_reply) or pick != other_reply[j]:
            break
    cache.length = len(turn.prompt_ids) + len(reply) - 1  # the prompt and the agreed tokens
    outdated = getattr(model, "cache_outdated", None)  # Phi-3's LongRoPE: the whole sequence again
    while True:
        tokens = torch.tensor([reply[-1:]])
        if outdated is not None and outdated(cache.length, len(turn.prompt_ids) + len(reply)):
            cache = model.new_cache(1, len(turn.prompt_ids) + CHAT_TOKENS)
            tokens = torch.tensor([turn.prompt_ids + reply])
        reply.append(int(torch.argmax(model(tokens, cache=cache)[0, -1])))
        if reply[-1] in turn.stops or len(reply) == CHAT_TOKENS:
            return reply


def unavailable(err: QloraError) -> ReferenceUnavailable:
    return ReferenceUnavailable(f"qlora's engine cannot run base + adapter to compare with ({err})")


def check_reference_runs(model_dir, adapter_dir) -> None:
    """ReferenceUnavailable now, before the other model runs, where our engine cannot attach the
    adapter (what it would find on loading the reference)."""
    from qlora.export.reference import check_adapter_attaches

    try:
        check_adapter_attaches(model_dir, adapter_dir)
    except QloraError as err:
        raise unavailable(err) from err


def run_reference(model_dir, adapter_dir, merge_base, device, samples, turn: ChatTurn | None,
                  work: Path, streamed: bool, other_reply: list[int] | None = None
                  ) -> tuple[list[Path], dict | None, str]:
    """(logit files, chat turn or None, description) of base + adapter; the chat turn where
    `turn` is given. A streamed reference (`streamed`, on the CPU) reads its greedy reply off a
    pass over `other_reply` (forced_greedy_reply); the whole model generates it."""
    from qlora.export.reference import load_check_reference

    try:
        model, what = load_check_reference(model_dir, adapter_dir, merge_base, device, streamed)
    except QloraError as err:
        raise unavailable(err) from err
    if streamed:
        paths, chat = streamed_run(model, samples, turn, other_reply or [], work, "reference")
        return paths, chat, what
    paths = logits_at_positions(model, samples, work, "reference")
    chat = None if turn is None else greedy_chat(model, turn)
    return paths, chat, what


def find_llama_python(explicit: str | None = None) -> str | None:
    """A python that imports llama_cpp: the one given, $QLORA_LLAMA_PYTHON, or this one."""
    if explicit:
        return explicit
    if os.environ.get("QLORA_LLAMA_PYTHON"):
        return os.environ["QLORA_LLAMA_PYTHON"]
    return sys.executable if importlib.util.find_spec("llama_cpp") is not None else None


def run_llama_cpp(gguf_file: Path, samples: list[Sample], messages: list[dict] | None, work: Path,
                  llama_python: str, chat_prompt_tokens: int = 0) -> tuple[list[Path], dict | None, str]:
    """(logit files, chat turn, 'llama.cpp VERSION') from llamacpp_worker.py in `llama_python`.
    chat_prompt_tokens: the conversation's length as we tokenize it (to size llama.cpp's context)."""
    worker = Path(__file__).with_name("llamacpp_worker.py")
    longest = max([len(s.ids) for s in samples] + [chat_prompt_tokens + CHAT_TOKENS])
    n_ctx = longest + max(64, longest // 8)  # room for a rendering a little longer than ours
    job = {"gguf": str(gguf_file), "n_ctx": n_ctx, "n_threads": os.cpu_count() or 1, "out_dir": str(work),
           "sequences": [s.ids for s in samples], "positions": [s.positions().tolist() for s in samples],
           "chat": None if messages is None else {"messages": messages, "max_new_tokens": CHAT_TOKENS}}
    (work / "job.json").write_text(json.dumps(job))
    try:
        done = subprocess.run([llama_python, str(worker), str(work / "job.json")], capture_output=True,
                              text=True)
    except OSError as err:
        raise QloraError(f"--llama-python {llama_python}: cannot run it ({err}); {LLAMA_HINT}") from err
    result_file = work / "result.json"
    if done.returncode != 0 or not result_file.exists():
        tail = (done.stderr or done.stdout).strip()[-1500:]
        if "No module named 'llama_cpp'" in tail:
            raise QloraError(f"{llama_python} cannot import llama_cpp; {LLAMA_HINT}")
        raise QloraError(f"llama.cpp could not run {gguf_file} (exit code {done.returncode}): {tail}")
    result = json.loads(result_file.read_text())
    return ([work / f"logits-{i}.npy" for i in range(len(samples))], result.get("chat"),
            f"llama.cpp (llama-cpp-python {result['version']})")


def gguf_state_dict(gguf_file: Path, model_dir: Path, headers=None) -> dict:
    """The GGUF's tensors dequantized (gguf.quants) to float32, turned back into Hugging Face's
    names and layout (what export/gguf.py did, undone: each tensor's entry of its plan, the
    export's own plan_tensors, read backwards: its STEPS inverted, a mixture of experts' stacks
    split into the source's per-expert tensors), shaped and named as the source checkpoint in
    model_dir stores them. A tied output head stays absent, as in that checkpoint. `headers`:
    model_dir's (models.weights.read_headers), where the caller has read them."""
    import gguf
    import torch

    from qlora.export.gguf import STEPS, arch_of, checkpoint_layout, gguf_shape, plan_tensors
    from qlora.export.gguf_generic import export_config, generic_family
    from qlora.models.spec import read_config
    from qlora.models.weights import headers_of

    config, source = read_config(model_dir)
    if generic_family(config) is not None:
        config = export_config(config, Path(source))
    headers = headers_of(model_dir, headers)
    shapes = headers.shapes()
    layout = checkpoint_layout(config, headers, None, Path(model_dir))
    # the file type only picks each entry's stored type, which the reader's dequantize reads
    planned = {p.name: p for p in plan_tensors(shapes, config, arch_of(config["model_type"]),
                                               "f16", Path(model_dir), layout)}
    state = {}
    for t in gguf.GGUFReader(str(gguf_file)).tensors:
        if t.name not in planned:
            continue  # rope_freqs: recomputed from config.json
        p = planned[t.name]
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if p.stacked:  # the experts in their stack's order
            x = x.reshape(len(p.sources), *shapes[p.sources[0]])
            state.update({name: torch.from_numpy(np.ascontiguousarray(x[e]))
                          for e, name in enumerate(p.sources)})
            continue
        name = p.sources[0]
        x = x.reshape(gguf_shape(shapes[name], p.steps))
        for step in reversed(p.steps):
            x = STEPS[step][1](x, config)
        state[name] = torch.from_numpy(np.ascontiguousarray(x))
    return state


def gguf_as_decoder(gguf_file: Path, model_dir: Path, device: str = "auto", headers=None):
    """gguf_state_dict loaded into our decoder with the source's config.json."""
    import torch
    from safetensors.torch import save_file

    from qlora.device import pick_device
    from qlora.models.spec import read_config
    from qlora.models.load import load_model
    from qlora.quant import QuantConfig

    state = gguf_state_dict(gguf_file, model_dir, headers)
    dev = pick_device(device)
    with tempfile.TemporaryDirectory(prefix="qlora-gguf-weights.") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(read_config(model_dir)[0]))
        save_file(state, str(Path(tmp) / "model.safetensors"))
        model = load_model(tmp, QuantConfig(method="none", compute_dtype=torch.float32), device=dev)
    return model


def gguf_stop_ids(reader) -> tuple[int, ...]:
    """End-of-generation tokens as the GGUF declares them: EOS, EOT, EOM, and the well-known
    end-of-turn tokens of its vocabulary (llama.cpp recognises those by their text)."""
    from qlora.chat import KNOWN_END_OF_TURN

    ids = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if key in reader.fields:
            ids.append(int(reader.fields[key].contents()))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    ids += [i for i, t in enumerate(tokens) if t in KNOWN_END_OF_TURN]
    return tuple(dict.fromkeys(ids))


def run_gguf_in_qlora(gguf_file: Path, model_dir: Path, tokenizer, samples, messages, work: Path,
                      device: str, headers=None) -> tuple[list[Path], dict | None, str]:
    """(logit files, chat turn, description) of the GGUF's own weights, template and stop tokens
    in our engine."""
    import gguf

    model = gguf_as_decoder(gguf_file, model_dir, device, headers)
    paths = logits_at_positions(model, samples, work, "gguf")
    chat = None
    if messages is not None:
        reader = gguf.GGUFReader(str(gguf_file))
        if "tokenizer.chat_template" not in reader.fields:
            chat = {"error": "the GGUF file holds no chat template (tokenizer.chat_template)"}
        else:
            template = reader.fields["tokenizer.chat_template"].contents()
            chat = greedy_chat(model, chat_turn(tokenizer, template, messages, gguf_stop_ids(reader)))
    return paths, chat, "qlora on the GGUF's dequantized weights"


# --- reports ------------------------------------------------------------------------------------
def report_path(out: Path) -> Path:
    """The JSON beside an output: m.gguf → m.check.json, merged/ → merged.check.json."""
    return out.with_suffix(".check.json") if out.suffix == ".gguf" else out.parent / f"{out.name}.check.json"


def write_report(path: Path, report: dict) -> None:
    from qlora.files import staged_file

    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")


def _compare(ref_paths, other_paths, samples) -> dict:
    pairs = ((np.load(a), np.load(b), s.targets()) for a, b, s in zip(ref_paths, other_paths, samples))
    return parity.compare_logits(pairs)


def _finish(report: dict, out: Path, tokenizer, log) -> dict:
    def token_name(tid):
        return tokenizer.convert_ids_to_tokens(int(tid))

    path = report_path(out)
    report["report"] = str(path)
    write_report(path, report)
    log(parity.format_table(report, token_name) + f"\n  report: {path}")
    if report["failures"]:
        raise QloraError(f"the check of {out} failed: {'; '.join(report['failures'])}. The output is "
                         f"kept for inspection; the numbers are in {path}")
    return report


# --- room for the reference ----------------------------------------------------------------------
OVERHEAD = 1.05  # a Llama-3-8B's 29.9 GiB of whole-model values measured 31.2 GiB of RSS
# the interpreter, torch and its libraries: a tiny model's streamed reference measured 0.40 GiB of
# RSS (benchmarks/reference_rss.py --shape tiny), more than 5% of a streamed 8B's few GiB
PROCESS_BYTES = 2**29


def reference_host_bytes(headers, merge_base: str, streamed: bool,
                         adapter_dir: str | Path | None = None,
                         samples: int = DEFAULT_SAMPLES) -> float:
    """Host memory the check's reference needs on the CPU, where it runs in float32
    (device.compute_dtype): 4 bytes a value of a 16-bit base, bitsandbytes' bytes for the linears
    of an NF4 one, + 5% (OVERHEAD: the interpreter and torch). The whole model: all its values.
    Streamed (export/reference.StreamedReference): the values outside the layers (embedding,
    final norm, head), the largest layer, the largest layer tensor once more in float32 (read
    while its layer loads), the adapter (its saved tensors and one layer's share in float32:
    twice its file at most) and the pass's activations (streamed_activation_bytes), + 5%, +
    PROCESS_BYTES. `headers`: the base's (models.weights.CheckpointHeaders)."""
    from collections import defaultdict
    from math import prod

    from qlora.export.reference import LAYER_KEYS, reference_quant
    from qlora.memory.weights import quantized_linear_tensors
    from qlora.merge import is_quantized_linear
    from qlora.models.spec import read_spec

    nf4 = reference_quant(merge_base) == "nf4"

    def value_bytes(name: str, shape: tuple[int, ...]) -> int:
        if nf4 and is_quantized_linear(name, shape):
            return sum(quantized_linear_tensors(*shape, "nf4"))
        return 4 * prod(shape)

    shapes = headers.shapes()
    if not streamed:
        return OVERHEAD * sum(value_bytes(name, shape) for name, shape in shapes.items())
    layers: dict[str, int] = defaultdict(int)
    outside = largest = 0
    for name, shape in shapes.items():
        if name.startswith(LAYER_KEYS):
            layers[name.split(".")[2]] += value_bytes(name, shape)
            largest = max(largest, 4 * prod(shape))
        else:
            outside += value_bytes(name, shape)
    adapter = 0
    if adapter_dir is not None and (Path(adapter_dir) / "adapter_model.safetensors").is_file():
        adapter = 2 * (Path(adapter_dir) / "adapter_model.safetensors").stat().st_size
    activations = streamed_activation_bytes(read_spec(headers.model_dir), samples)
    values = outside + max(layers.values(), default=0) + largest + adapter + activations
    return OVERHEAD * values + PROCESS_BYTES


def streamed_activation_bytes(spec, samples: int, tokens: int = MAX_TOKENS) -> int:
    """Float32 activations of a streamed reference's pass over `samples` sequences of `tokens`
    (upper bounds): every sequence's hidden states twice (a layer's inputs and outputs); inside a
    layer, one sequence's MLP intermediates (gate, up, silu's output, their product; a mixture
    of experts' routed rows: top_k per token), q/k/v, the output and the norms, and every head's
    scores twice (the CPU's attention may form them, then their softmax); one sequence's logits
    twice (the head's output and the compared rows); the chat turn's KV cache."""
    width = spec.intermediate_size
    if spec.moe is not None:
        width = max(width, spec.moe.top_k * spec.moe.expert_intermediate_size)
    layer = tokens * (4 * width + 8 * spec.hidden_size) + 2 * spec.num_heads * tokens * tokens
    kv_cache = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * (tokens + CHAT_TOKENS)
    return 4 * (2 * samples * tokens * spec.hidden_size + layer + 2 * tokens * spec.vocab_size
                + kv_cache)


def reference_mode(whole: float, streamed: float | None, available: float | None) -> str | None:
    """How the check's reference runs on the CPU, from reference_host_bytes' sizes and the host's
    available bytes (None: not known): "whole" where the whole model fits (or nothing is known),
    "streamed" (a layer at a time) where only that does, None where neither does. The whole
    model first: its greedy chat reply costs a decode step a token, a streamed one's up to a pass
    over the checkpoint a token (~10 s at 8B on 2 cores, estimated). `streamed` None: the model
    cannot stream (the generic path)."""
    if available is None or whole <= available:
        return "whole"
    if streamed is not None and streamed <= available:
        return "streamed"
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


@dataclass
class ReferencePlan:
    """The check's reference as reference_plan sized it; the sizes None where not sized (a GPU,
    or a host that does not say its available memory)."""
    mode: str | None  # reference_mode's
    whole: float | None = None
    streamed: float | None = None
    available: int | None = None

    @property
    def streams(self) -> bool:
        """A layer at a time: where reference_mode says so, or where neither fits (check_fits_host
        refuses that before an export; a check called on its own tries the smaller)."""
        if self.mode is None:
            return self.streamed is not None and self.streamed < self.whole
        return self.mode == "streamed"

    def describe(self) -> str:
        """How the reference runs, for the check's table."""
        if not self.streams:
            return "whole model" if self.whole is None else f"whole model ({_gib(self.whole)})"
        return (f"streamed a layer at a time ({_gib(self.streamed)}; the whole model's "
                f"{_gib(self.whole)} does not fit this host's {_gib(self.available)} available)")

    def shortfall(self) -> str | None:
        """Why this host cannot hold the reference, or None."""
        if self.mode is not None:
            return None
        streamed = "" if self.streamed is None else f" ({_gib(self.streamed)} a layer at a time)"
        return (f"the check's reference (base + adapter in float32 on the CPU) needs about "
                f"{_gib(self.whole)} of host memory{streamed} and {_gib(self.available)} are "
                f"available; run the export on a GPU (--device cuda), or leave the check out "
                f"(--no-check)")


def reference_plan(headers, merge_base: str, device: str, adapter_dir: str | Path | None = None,
                   samples: int = DEFAULT_SAMPLES) -> ReferencePlan:
    """Both sizes of the check's reference on the CPU (the streamed one for a native family) and
    reference_mode's pick against the host's available memory; on a GPU, the whole model
    unsized. `headers`: the base's (models.weights.CheckpointHeaders)."""
    from qlora.device import pick_device
    from qlora.export.reference import can_stream
    from qlora.memory.host import host_available_bytes

    available = host_available_bytes()
    if pick_device(device).type != "cpu" or available is None:
        return ReferencePlan("whole")
    whole = reference_host_bytes(headers, merge_base, False)
    streamed = (reference_host_bytes(headers, merge_base, True, adapter_dir, samples)
                if can_stream(headers.model_dir) else None)
    return ReferencePlan(reference_mode(whole, streamed, available), whole, streamed, available)


def check_fits_host(check: bool | None, headers, merge_base: str, device: str,
                    note: Callable[[str], None], adapter_dir: str | Path | None = None,
                    samples: int | None = None) -> bool:
    """Whether the check (asked for, or by default) still runs once the host's memory is known:
    an asked-for check that cannot is a QloraError, a default one is skipped with a note; said
    before the export's minutes, not by the kernel killing the process after them.
    `headers`: the base's (models.weights.CheckpointHeaders)."""
    shortfall = reference_plan(headers, merge_base, device, adapter_dir,
                               samples or DEFAULT_SAMPLES).shortfall()
    if shortfall and check:
        raise QloraError(f"--check: {shortfall}")
    if shortfall:
        note(f"note: check skipped: {shortfall}")
    return shortfall is None


# --- the two checks -----------------------------------------------------------------------------
def check_gguf(gguf_file: str | Path, model_dir: str | Path, qtype: str, adapter_dir=None,
               merge_base: str = "original", data=None, samples: int = DEFAULT_SAMPLES,
               engine: str = "llama.cpp", llama_python: str | None = None, device: str = "auto",
               log: Callable[[str], None] = print, headers=None) -> dict:
    """Compare the GGUF file (in llama.cpp, or engine "qlora") with base + adapter on held-out
    tokens; print the table, write the JSON beside the file; QloraError naming the part that
    differs when a limit is passed. `headers`: model_dir's (models.weights.read_headers), where
    the caller has read them."""
    from qlora.models import load_tokenizer
    from qlora.models.weights import headers_of

    gguf_file, model_dir = Path(gguf_file), Path(model_dir)
    if engine not in ("llama.cpp", "qlora"):
        raise QloraError(f"--check-engine {engine!r}: choose llama.cpp or qlora")
    python = find_llama_python(llama_python) if engine == "llama.cpp" else None
    if engine == "llama.cpp" and python is None:
        raise QloraError(f"--check: llama-cpp-python is not importable; {LLAMA_HINT}")
    tokenizer = load_tokenizer(model_dir)
    picked, source = check_samples(tokenizer, data, adapter_dir, samples, log)
    turn = reference_chat_turn(tokenizer, model_dir, picked)
    messages = None if turn is None else turn.messages
    plan = reference_plan(headers_of(model_dir, headers), merge_base, device, adapter_dir, samples)
    with tempfile.TemporaryDirectory(prefix="qlora-check.") as tmp:
        work = Path(tmp)

        def run_file():
            if engine == "llama.cpp":
                return run_llama_cpp(gguf_file, picked, messages, work, python,
                                     len(turn.prompt_ids) if turn else 0)
            return run_gguf_in_qlora(gguf_file, model_dir, tokenizer, picked, messages, work, device,
                                     headers)

        if plan.streams:  # the file first: the streamed reference reads its chat reply off the file's
            check_reference_runs(model_dir, adapter_dir)  # a misfit adapter said before the file runs
            paths, chat, engine_name = run_file()
            other_reply = chat["reply_ids"] if chat and "reply_ids" in chat else []
            ref_paths, ref_chat, what = run_reference(model_dir, adapter_dir, merge_base, device,
                                                      picked, turn, work, True, other_reply)
        else:  # the reference first: one that cannot run is said before the file's minutes
            ref_paths, ref_chat, what = run_reference(model_dir, adapter_dir, merge_base, device,
                                                      picked, turn, work, False)
            paths, chat, engine_name = run_file()
        stats = _compare(ref_paths, paths, picked)
    limits = parity.EXPORT_LIMITS[qtype]
    failures = parity.judge_logits(stats, limits)
    report = {"subject": f"{gguf_file.name} ({qtype})", "file": str(gguf_file), "type": qtype,
              "engine": engine_name, "engine_short": "llama.cpp" if engine == "llama.cpp" else "GGUF",
              "reference": what, "reference_run": plan.describe(), "data": source,
              "examples": len(picked), "logits": stats, "limits": parity.limits_dict(limits)}
    if ref_chat is not None and chat is not None:
        report["chat"], chat_failures = parity.compare_chat(ref_chat, chat, tokenizer.convert_ids_to_tokens)
        report["chat_turns"] = {"reference": ref_chat, "gguf": chat, "messages": messages}
        failures += chat_failures
    elif ref_chat is None:
        report["chat"] = None
    report["failures"], report["passed"] = failures, not failures
    return _finish(report, gguf_file, tokenizer, log)


def check_merge(out_dir: str | Path, model_dir: str | Path, adapter_dir: str | Path, dtype: str,
                merge_base: str = "original", data=None, samples: int = DEFAULT_SAMPLES,
                device: str = "auto", log: Callable[[str], None] = print, headers=None) -> dict:
    """Compare the merged checkpoint, loaded back by our engine (whole or a layer at a time, as
    the reference), with base + adapter. `headers`: model_dir's, where the caller has read them."""
    from qlora.export.reference import load_check_reference
    from qlora.merge import normalise_dtype
    from qlora.models import load_tokenizer
    from qlora.models.weights import headers_of

    out_dir, dtype = Path(out_dir), normalise_dtype(dtype)
    tokenizer = load_tokenizer(model_dir)
    picked, source = check_samples(tokenizer, data, adapter_dir, samples, log)
    plan = reference_plan(headers_of(model_dir, headers), merge_base, device, adapter_dir, samples)
    with tempfile.TemporaryDirectory(prefix="qlora-check.") as tmp:
        work = Path(tmp)
        ref_paths, _, what = run_reference(model_dir, adapter_dir, merge_base, device, picked, None,
                                           work, plan.streams)
        # quant none; the same size as the reference's (both float32 on the CPU)
        merged, _ = load_check_reference(out_dir, None, "original", device, plan.streams)
        paths = logits_at_positions(merged, picked, work, "merged")
        del merged
        stats = _compare(ref_paths, paths, picked)
    limits = parity.MERGE_LIMITS[dtype]
    failures = parity.judge_logits(stats, limits)
    report = {"subject": f"{out_dir.name} ({dtype})", "file": str(out_dir), "type": dtype,
              "engine": "qlora (the merged checkpoint loaded back)", "engine_short": "merged",
              "reference": what, "reference_run": plan.describe(), "data": source,
              "examples": len(picked), "logits": stats, "limits": parity.limits_dict(limits),
              "failures": failures, "passed": not failures}
    return _finish(report, out_dir, tokenizer, log)
