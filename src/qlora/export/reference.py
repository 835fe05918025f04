"""The model an export or a merge is measured against: base + adapter in our own engine.

Which base: the one the merge folds the adapter into (`--base`). With `original` (the default) the
merged weights are W + ΔW, so the reference holds the base in its stored 16-bit precision
(quant "none") with the adapter on top; with `nf4` it holds the base in NF4, as QLoRA training saw
it. Either way the comparison isolates what merge and export add (folding, rounding to the file's
types, llama.cpp's arithmetic), not the gap between the 16-bit and the NF4 base, which
docs/MERGE_AND_EXPORT.md measures on its own.

On the CPU the check's reference runs in float32: the whole model where it fits the host (twice
the 16-bit checkpoint's size: 31 GiB for a Llama-3-8B), else a layer at a time (StreamedReference:
its embedding, head and one layer; check.reference_mode decides).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

LAYER_KEYS = "model.layers."  # every native family's decoder layers, in the checkpoint's keys


def reference_quant(merge_base: str) -> str:
    from qlora.merge import normalise_base

    return "nf4" if normalise_base(merge_base) == "dequantized-nf4" else "none"


def _described(quant: str, adapter_dir) -> str:
    base = "the NF4 base" if quant == "nf4" else "the 16-bit base"
    return f"{base} + adapter" if adapter_dir is not None else base


def load_reference(model_dir: str | Path, adapter_dir: str | Path | None, merge_base: str = "original",
                   device: str = "auto"):
    """(model, tokenizer, description) of base (+ adapter) as the merge sees it, ready to run,
    the whole model in memory."""
    from qlora.infer import load_for_inference

    quant = reference_quant(merge_base)
    # merge and export check the adapter's base name themselves, with the user's --ignore-base-name
    model, tokenizer = load_for_inference(model_dir, adapter_dir, quant=quant, device=device,
                                          ignore_base_name=True)
    return model, tokenizer, f"{_described(quant, adapter_dir)} in qlora"


def can_stream(model_dir: str | Path) -> bool:
    """Whether the check's reference can run a layer at a time: a native family's (the generic
    path's model is transformers' own)."""
    from qlora.models.spec import is_native, read_config

    return is_native(read_config(model_dir)[0])


def load_check_reference(model_dir: str | Path, adapter_dir: str | Path | None,
                         merge_base: str = "original", device: str = "auto", streamed: bool = False):
    """(model, description) for the check: a StreamedReference on the CPU where `streamed`
    (check.reference_mode's pick), else the whole model (load_reference). No tokenizer: the
    check has its own."""
    if not streamed:
        model, _, what = load_reference(model_dir, adapter_dir, merge_base, device)
        return model, what
    from qlora.device import compute_dtype
    from qlora.quant import QuantConfig

    quant = reference_quant(merge_base)
    cpu = torch.device("cpu")
    # the quantization load_for_inference gives the whole model on the CPU
    qc = QuantConfig(method=quant, double_quant=True, compute_dtype=compute_dtype(cpu))
    model = StreamedReference(model_dir, adapter_dir, qc)
    return model, f"{_described(quant, adapter_dir)} in qlora"


def check_adapter_attaches(model_dir: str | Path, adapter_dir: str | Path | None,
                           saved=None) -> None:
    """QloraError where the adapter does not attach to the model (its names, shapes, features),
    found on the model built empty (the meta device): no weight read. A native family's only
    (the generic path finds out on loading)."""
    from qlora.adapters import load_adapter, read_saved_adapter
    from qlora.models.load import new_decoder
    from qlora.models.spec import is_native, read_config, read_spec

    if adapter_dir is None or not is_native(read_config(model_dir)[0]):
        return
    saved = saved or read_saved_adapter(adapter_dir)
    with torch.device("meta"):
        load_adapter(new_decoder(read_spec(model_dir)), adapter_dir, saved)


class StreamedReference(nn.Module):
    """Base + adapter on the CPU with one decoder layer in memory at a time.

    The embedding, final norm and head stay; each pass reads every layer from the checkpoint in
    turn (its linears quantized as `quant` says and the adapter attached, as load_for_inference
    does for the whole model), runs all the pass's sequences through it and frees it. The
    modules, weights and order of operations of each sequence are the whole model's, so are its
    logits. Each pass reads the whole checkpoint: the check makes one for all its examples and
    its chat turn's prompt and forced reply, then one per token it generates on
    (check.forced_greedy_reply; `forward` with a KV cache, as qlora.infer.generate calls it)."""

    def __init__(self, model_dir: str | Path, adapter_dir: str | Path | None, quant):
        from qlora.adapters import read_saved_adapter
        from qlora.models.load import load_model
        from qlora.models.weights import check_nothing_missing, shard_keys

        super().__init__()
        self.model_dir, self.adapter_dir, self.quant = Path(model_dir), adapter_dir, quant
        self.keys = shard_keys(model_dir)  # each layer's read finds its tensors' shards here
        self.saved_adapter = None if adapter_dir is None else read_saved_adapter(adapter_dir)
        self.shell = load_model(model_dir, quant, "cpu",
                                only=lambda key: not key.startswith(LAYER_KEYS), keys=self.keys)
        self.spec = self.shell.spec
        check_nothing_missing(self.shell, self.model_dir, skip=LAYER_KEYS)
        check_adapter_attaches(model_dir, adapter_dir, self.saved_adapter)  # before a pass
        self.empty_layers = list(self.shell.model.layers)  # on the meta device
        if hasattr(self.shell, "cache_outdated"):  # Phi-3's LongRoPE: qlora.infer.stream asks
            self.cache_outdated = self.shell.cache_outdated
        self.eval()

    def layer(self, index: int) -> nn.Module:
        """Decoder layer `index`, read from the checkpoint, adapter attached; in the shell's
        layers until `drop_layer`."""
        import copy

        from qlora.adapters import load_adapter
        from qlora.models.load import read_weights
        from qlora.models.weights import check_nothing_missing

        prefix = f"{LAYER_KEYS}{index}."
        self.shell.model.layers[index] = copy.deepcopy(self.empty_layers[index])
        read_weights(self.shell, self.model_dir, self.quant, torch.device("cpu"),
                     only=lambda key: key.startswith(prefix), keys=self.keys)
        if self.saved_adapter is not None:
            load_adapter(self.shell, self.adapter_dir, self.saved_adapter, within=prefix)
        layer = self.shell.model.layers[index]
        check_nothing_missing(layer, self.model_dir)
        return layer.eval()

    def drop_layer(self, index: int) -> None:
        self.shell.model.layers[index] = self.empty_layers[index]

    @torch.no_grad()
    def hidden_states(self, sequences: list[torch.Tensor], caches: list | None = None
                      ) -> list[torch.Tensor]:
        """The final norm's output for each [1, T] sequence (after its cache's tokens, where
        `caches` gives one), every layer read once for all of them."""
        shell, caches = self.shell, caches or [None] * len(sequences)
        inputs = [shell.layer_inputs(ids, cache=cache) for ids, cache in zip(sequences, caches)]
        xs = [shell.embed(ids) for ids in sequences]
        for index in range(self.spec.num_layers):
            layer = self.layer(index)
            xs = [layer(x, cos, sin, masks[index], cache)
                  for x, (cos, sin, masks), cache in zip(xs, inputs, caches)]
            self.drop_layer(index)
            del layer  # freed before the next one is read
        for ids, cache in zip(sequences, caches):
            if cache is not None:
                cache.length += ids.shape[1]
        return [shell.model.norm(x) for x in xs]

    def each_logits(self, sequences: list[torch.Tensor]):
        """Each sequence's logits in turn, from one pass (one [1, T, V] alive at a time)."""
        for hidden in self.hidden_states(sequences):
            yield self.logits(hidden)  # (a `with no_grad` here would outlive each yield)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.shell.logits(hidden)

    def forward(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        return self.logits(self.hidden_states([input_ids], [cache])[0])

    def new_cache(self, batch: int, limit: int):
        return self.shell.new_cache(batch, limit)
