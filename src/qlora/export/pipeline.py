"""`qlora export`: importance matrix → GGUF → Modelfile → check, each step only when asked.

Everything that can be refused is refused before the first slow step (outputs that exist, a type
the importance matrix cannot steer, a chat template Ollama's syntax cannot express, a check that
was asked for but cannot run, --check-data that cannot be read, a disk without room for the GGUF
file). Each output is written whole or not at all; a failed check keeps the GGUF (and its report)
for inspection and says so.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from qlora.errors import QloraError
from qlora.files import check_readable, refuse_existing


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


def refuse_generic_imatrix(config: dict, imatrix_data) -> None:
    """The importance matrix hooks the native decoder's linears (imatrix.linear_modules); a model
    on the generic path has transformers' own modules, its GGUF is written without one."""
    from qlora.models.spec import is_native

    if imatrix_data is not None and not is_native(config):
        raise QloraError(f"--imatrix-data: model_type {config.get('model_type')!r} runs on the "
                         "generic path, where qlora measures no importance matrix; export it "
                         "without --imatrix-data (the k-quants then weigh every column alike)")


def decide_check(check: bool | None, engine: str, llama_python: str | None,
                 note: Callable[[str], None]) -> bool:
    """Whether the check runs: asked for (and able to), or by default where it can."""
    from qlora.export.check import LLAMA_HINT, find_llama_python

    if check is False:
        return False
    if engine == "qlora" or find_llama_python(llama_python) is not None:
        return True
    if check:
        raise QloraError(f"--check: llama-cpp-python is not importable; {LLAMA_HINT}")
    note(f"note: check skipped: llama-cpp-python is not importable; to check the file in llama.cpp, "
         f"{LLAMA_HINT}")
    return False


def export_model(model_dir: str | Path, out: str | Path, qtype: str = "f16", adapter_dir=None,
                 merge_base: str = "original", ignore_base_name: bool = False, imatrix_data=None,
                 imatrix_samples: int | None = None, check: bool | None = None, check_data=None,
                 check_samples: int | None = None, check_engine: str = "llama.cpp",
                 llama_python: str | None = None, ollama: bool = False, device: str = "auto",
                 threads: int | None = None, log: Callable[[str], None] = print,
                 note: Callable[[str], None] = _stderr) -> dict:
    """Write the GGUF (and what was asked for beside it); {gguf, modelfile, report} paths."""
    from qlora.export import check as check_mod
    from qlora.export import imatrix as imatrix_mod
    from qlora.export import ollama as ollama_mod
    from qlora.export.gguf import check_export_inputs, check_qtype, open_gguf
    from qlora.export.mixtures import K_QUANT_FILES
    from qlora.models.weights import read_headers

    out, qtype = Path(out), check_qtype(qtype)
    if imatrix_data is not None and qtype not in K_QUANT_FILES:
        raise QloraError(f"--imatrix-data steers the k-quants only; --type {qtype} does not use it: "
                         f"drop it or choose one of {', '.join(K_QUANT_FILES)}")
    if check_engine not in ("llama.cpp", "qlora"):
        raise QloraError(f"--check-engine {check_engine!r}: choose llama.cpp or qlora")
    run_check = decide_check(check, check_engine, llama_python, note)
    if run_check and check_data is not None:
        check_readable(check_data, "--check-data")  # read after the GGUF is written
    outputs = {"gguf": out, "modelfile": ollama_mod.modelfile_path(out) if ollama else None,
               "report": check_mod.report_path(out) if run_check else None}
    for path in outputs.values():  # the GGUF and the files named after it
        if path is not None:
            refuse_existing(path, "--out")
    # open_gguf refuses these too (it is called alone as well): here they come before the
    # headers, the check's host sizing and the importance matrix's forwards
    config = check_export_inputs(Path(model_dir), out, qtype, threads)
    refuse_generic_imatrix(config, imatrix_data)
    headers = read_headers(model_dir)  # once: each step below takes them from here
    if run_check and not check_mod.check_fits_host(check, headers, merge_base, device, note,
                                                   adapter_dir, check_samples):
        run_check, outputs["report"] = False, None
    translation = ollama_mod.translate(model_dir, adapter_dir) if ollama else None
    if translation is not None and translation.why is not None:
        note(f"ollama: prompts rendered with {translation.why}")

    # the GGUF's plan, metadata and free-space check come before the importance matrix's forwards
    with open_gguf(model_dir, out, qtype, adapter_dir, merge_base, ignore_base_name, log=note,
                   threads=threads, device=device, headers=headers) as gguf_file:
        imatrix = None
        if imatrix_data is not None:
            imatrix = imatrix_mod.compute_imatrix(model_dir, imatrix_data, adapter_dir, merge_base,
                                                  imatrix_samples or imatrix_mod.DEFAULT_SAMPLES,
                                                  device, log=note)
        gguf_file.write_tensors(imatrix)
    if translation is not None:
        ollama_mod.write_modelfile(translation, out)
    if run_check:
        try:
            check_mod.check_gguf(out, model_dir, qtype, adapter_dir, merge_base, check_data,
                                 check_samples or check_mod.DEFAULT_SAMPLES, check_engine, llama_python,
                                 device, log=log, headers=headers)
        except check_mod.ReferenceUnavailable as err:
            if check:
                raise
            note(f"note: check skipped: {err}")
    return outputs
