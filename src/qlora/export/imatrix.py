"""An importance matrix from the user's own data: how much each input column of each linear matters.

A weight error δ in row r of a linear layer changes output r by δ·x; over the data its expected
square is Σ_j δ_j² · E[x_j²] when the inputs' columns are uncorrelated. So the mean squared
activation of each input column, E[x_j²], is what a rounding error in column j costs, and the
k-quants' scale search (kquants.py) weighs each error by it — what llama.cpp's `llama-imatrix`
collects and `llama-quantize --imatrix` uses, computed here in our own engine on the model being
exported (base + adapter), over the data the adapter was trained on.

Hooks on every linear of the decoder blocks and on lm_head add up x² per column over every token of
up to `samples` examples, each run alone (no padding, so only real tokens count). q/k/v read the
same input, as do gate/up; each keeps its own entry so that the exporter looks one up by the
tensor's own name. A mixture of experts' experts (the reference's loop over experts) get one
entry each, under the checkpoint's per-expert names, averaged over the tokens routed to that
expert alone, as llama.cpp's imatrix keeps them; an expert no token reached gets none.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from qlora.errors import QloraError

DEFAULT_SAMPLES = 128
MAX_TOKENS = 512  # per example: longer ones are cut (the statistics settle long before)
# Columns no sample ever activated still hold weights the model may use on other text: they get
# this fraction of the tensor's mean importance rather than none, so their values stay coded.
FLOOR = 1e-3


def spread(n_items: int, n_wanted: int) -> list[int]:
    """Indices of up to n_wanted items spread evenly over n_items (the whole file, not its head)."""
    if n_items <= n_wanted:
        return list(range(n_items))
    return sorted({round(i * (n_items - 1) / max(1, n_wanted - 1)) for i in range(n_wanted)})


def sample_token_ids(data_path: str | Path, tokenizer, samples: int, max_tokens: int = MAX_TOKENS,
                     chat_template: str | None = None) -> list[list[int]]:
    """Token ids of up to `samples` examples of the data file, spread over it, as training
    encodes them (chat template, prompt and response: every token, since all of them pass through
    the layers)."""
    from qlora.data import prepare

    encoded, _ = prepare(str(data_path), tokenizer, train_on="all", max_len=max_tokens,
                         chat_template=chat_template, cache=False)
    return [encoded[i]["input_ids"] for i in spread(len(encoded), samples)]


def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Hugging Face module name → module, for each matrix multiply GGUF stores (block linears,
    with or without an adapter around them, and lm_head)."""
    from qlora.models.load import BLOCK_LINEAR

    out = {name: m for name, m in model.named_modules() if BLOCK_LINEAR.match(name)}
    out["lm_head"] = model.lm_head
    return out


def add_squares(sums: dict, key, x: torch.Tensor) -> int:
    """sums[key] += x² summed over every row of x [..., columns] (float64); returns the rows."""
    rows = x.detach().float().reshape(-1, x.shape[-1])
    sq = rows.pow(2).sum(0, dtype=torch.float64)
    sums[key] = sq if key not in sums else sums[key] + sq
    return rows.shape[0]


@torch.no_grad()
def collect(model: torch.nn.Module, sequences: list[list[int]],
            progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, np.ndarray], int]:
    """(weight name → mean x² per input column (float32), tokens seen) over `sequences`."""
    from qlora.models.decoder import compute_device

    sums: dict[str, torch.Tensor] = {}
    tokens = 0

    def hook_for(name: str):
        def hook(_module, args):
            add_squares(sums, name, args[0])
        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in linear_modules(model).items()]
    experts = ExpertSums(model)
    handles += experts.hooks()
    device = compute_device(model)
    was_training = model.training
    model.eval()
    try:
        for i, ids in enumerate(sequences):
            model(torch.tensor([ids], device=device))
            tokens += len(ids)
            if progress is not None:
                progress(i + 1, len(sequences))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if tokens == 0:
        raise QloraError("--imatrix-data: no tokens to measure activations on")
    out = {f"{name}.weight": (s / tokens).float().cpu().numpy() for name, s in sums.items()}
    out.update(experts.means())
    if model.lm_head.weight is model.model.embed_tokens.weight:
        # tied: the output matrix multiply is the embedding's, stored under its name
        out["model.embed_tokens.weight"] = out.pop("lm_head.weight")
    return out, tokens


class ExpertSums:
    """x² per column of each expert's own input, and its token count, for each projection of a
    mixture of experts (models/families/moe_blocks.ExpertLinear: called once per expert with the
    tokens routed to it); means() gives them under the checkpoint's per-expert names (gate_up_proj
    is two of them, gate and up, reading the same input)."""

    def __init__(self, model: torch.nn.Module):
        from qlora.models.families.moe_blocks import ExpertLinear

        self.model_type = getattr(getattr(model, "spec", None), "model_type", None)
        self.modules = {name: m for name, m in model.named_modules() if isinstance(m, ExpertLinear)}
        self.sums: dict[tuple[str, int], torch.Tensor] = {}
        self.counts: dict[tuple[str, int], int] = {}

    def hooks(self) -> list:
        return [m.register_forward_pre_hook(self._hook_for(name)) for name, m in self.modules.items()]

    def _hook_for(self, name: str):
        def hook(_module, args):
            key = (name, int(args[1]))
            self.counts[key] = self.counts.get(key, 0) + add_squares(self.sums, key, args[0])
        return hook

    def means(self) -> dict[str, np.ndarray]:
        from qlora.models.families.moe_config import hub_expert_key

        out = {}
        for (name, expert), s in self.sums.items():
            # "model.layers.N.mlp.experts.gate_up_proj" (".base_layer" under an adapter)
            layer, projection = name.removesuffix(".base_layer").split(".mlp.experts.")
            mean = (s / self.counts[(name, expert)]).float().cpu().numpy()
            for part in range(self.modules[name].members):
                out[hub_expert_key(self.model_type, layer, projection, expert, part)] = mean
        return out


def with_floor(imatrix: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each vector plus FLOOR × its mean, so a column the data never reached is still coded."""
    return {k: (v + FLOOR * max(float(v.mean()), 1e-30)).astype(np.float32) for k, v in imatrix.items()}


def compute_imatrix(model_dir: str | Path, data_path: str | Path, adapter_dir: str | Path | None = None,
                    merge_base: str = "original", samples: int = DEFAULT_SAMPLES, device: str = "auto",
                    log: Callable[[str], None] = print) -> dict[str, np.ndarray]:
    """The importance matrix of base (+ adapter) over up to `samples` examples of `data_path`,
    run in our engine (export/reference.py loads the model the export writes)."""
    from qlora.export.reference import load_reference
    from qlora.files import check_readable

    if samples < 1:
        raise QloraError(f"--imatrix-samples {samples}: give at least 1")
    check_readable(data_path, "--imatrix-data")
    model, tokenizer, what = load_reference(model_dir, adapter_dir, merge_base, device)
    sequences = sample_token_ids(data_path, tokenizer, samples)
    log(f"importance matrix: {len(sequences)} examples of {data_path} through {what}")
    imatrix, tokens = collect(model, sequences)
    log(f"importance matrix: {tokens} tokens, {len(imatrix)} matrices")
    del model
    return with_floor(imatrix)
