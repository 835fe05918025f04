"""The llama.cpp side of `qlora export --check`: run a GGUF file through llama-cpp-python.

Started as a subprocess (`python llamacpp_worker.py JOB.json`) by export/check.py, so that it can
run in another virtualenv (the one llama-cpp-python is built in) and so that an abort inside
llama.cpp is reported instead of ending the export. It imports only the standard library, numpy
and llama_cpp — never qlora, torch or transformers.

The job (JSON): gguf, n_ctx, n_threads, out_dir, sequences (token ids), positions (per sequence,
the positions whose logits to keep), chat (messages, max_new_tokens) or null.
It writes out_dir/logits-I.npy (float32, one row per kept position) and out_dir/result.json:
llama-cpp-python's version and, for the chat, the prompt as the file's own chat template renders
it, its tokens as llama.cpp's tokenizer reads them, the greedy reply and the end-of-generation
token it stopped on (null when it ran out of tokens first).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def is_end_of_generation(llm, token: int) -> bool:
    """llama.cpp's own end-of-generation test (EOS, EOT and the tokens it knows end a turn)."""
    import llama_cpp

    if hasattr(llama_cpp, "llama_vocab_is_eog"):  # llama.cpp with a separate vocab object
        return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token))
    return bool(llama_cpp.llama_token_is_eog(llm.model, token))


def token_text(llm, key: str) -> str:
    """The text of the special token the metadata names under `key` ('' when there is none)."""
    tid = llm.metadata.get(key)
    if tid is None:
        return ""
    return llm.detokenize([int(tid)], special=True).decode("utf-8", errors="replace")


def greedy_chat(llm, messages: list[dict], max_new_tokens: int) -> dict:
    """Render the conversation with the GGUF's chat template, then answer greedily until llama.cpp
    says the generation ends (or max_new_tokens)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if template is None:
        return {"error": "the GGUF file holds no chat template (tokenizer.chat_template)"}
    formatter = Jinja2ChatFormatter(template, eos_token=token_text(llm, "tokenizer.ggml.eos_token_id"),
                                    bos_token=token_text(llm, "tokenizer.ggml.bos_token_id"),
                                    add_generation_prompt=True)
    text = formatter(messages=messages).prompt
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    llm.reset()
    llm.eval(ids)
    reply, stopped_on = [], None
    for _ in range(max_new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        reply.append(token)
        if is_end_of_generation(llm, token):
            stopped_on = token
            break
        llm.eval([token])
    return {"text": text, "prompt_ids": list(ids), "reply_ids": reply, "stopped_on": stopped_on}


def run(job_file: str) -> None:
    import llama_cpp

    job = json.loads(Path(job_file).read_text())
    out = Path(job["out_dir"])
    llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=job["n_ctx"], n_batch=min(job["n_ctx"], 512),
                          logits_all=True, n_threads=job["n_threads"], seed=0, verbose=False)
    result = {"version": llama_cpp.__version__}
    for i, (ids, positions) in enumerate(zip(job["sequences"], job["positions"])):
        llm.reset()
        llm.eval(ids)
        scores = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        np.save(out / f"logits-{i}.npy", scores[np.asarray(positions, dtype=np.int64)])
    if job.get("chat"):
        result["chat"] = greedy_chat(llm, job["chat"]["messages"], job["chat"]["max_new_tokens"])
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    run(sys.argv[1])
