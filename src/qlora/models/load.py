"""A model directory in Hugging Face layout → DecoderLM on the target device, streamed (another
architecture goes to the generic path, generic.py, which streams the same way).

Tensors are read one at a time from memory-mapped safetensors, shard after shard; each linear
weight of the decoder blocks is quantized on the target device as soon as it is read, so the
16-bit model never exists whole in host or device memory. Checkpoints already saved in 4 bits by
transformers + bitsandbytes are rebuilt from their stored bytes, not re-quantized.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from qlora.errors import QloraError
from qlora.models.decoder import DecoderLM
from qlora.models.families import gemma2, gemma3, mixtral, phi3, qwen3_moe
from qlora.models.families.gemma import GemmaLM
from qlora.models.families.moe_blocks import ExpertLinear, MoeLM
from qlora.models.families.moe_config import (EXPERT_LINEARS, HUB_EXPERT, STACKED_EXPERTS,
                                              module_key)
from qlora.models.families.phi3_blocks import Phi3LM
from qlora.models.generic import GenericLM, GenericSpec, load_generic, read_generic_spec
from qlora.models.spec import ArchSpec, is_native, read_config, read_spec
from qlora.models.weights import check_nothing_missing, replace_keeping_bias, shard_keys
from qlora.models.weights import open_shard as _open, read_tensor as _read  # tests spy on _read
from qlora.quant import (QuantConfig, QuantizedStack, prequantized_linear, quantize_linear,
                         quantize_linear_rows, rows_align)

# every family's block linears (phi3's fused qkv_proj and gate_up_proj among them)
BLOCK_LINEAR = re.compile(
    r"^model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down|qkv|gate_up)_proj$")
IGNORED_KEYS = re.compile(r"rotary_emb\.inv_freq$")
# What travels with a model or an adapter besides weights (copied as they are, where present)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


# the families whose blocks are their own, by model_type. Their block modules build on
# models/decoder.py, which reads specs through models/families/: named here, above both, rather
# than in the family modules (an import cycle).
OWN_DECODERS = {gemma2.MODEL_TYPE: GemmaLM, gemma3.MODEL_TYPE: GemmaLM, phi3.MODEL_TYPE: Phi3LM,
                mixtral.MODEL_TYPE: MoeLM, qwen3_moe.MODEL_TYPE: MoeLM}


def new_decoder(spec: ArchSpec) -> DecoderLM:
    """The decoder of spec's family: the reference's, or that of a family with blocks of its own
    (OWN_DECODERS)."""
    return OWN_DECODERS.get(spec.model_type, DecoderLM)(spec)


def rebuild_rotary(model: DecoderLM, spec: ArchSpec, device) -> None:
    """The RoPE tables, built on the meta device with the model, made again on `device` (by the
    class the model has: Gemma's holds one table per layer kind)."""
    model.model.rotary_emb = type(model.model.rotary_emb)(spec).to(device)


@dataclass(frozen=True)
class RowPart:
    """Read only part `index` of `count` of every tensor's rows (dim 0), in torch.chunk's split,
    and leave the other rows zero: what one rank of a sharded run keeps (FSDP2 cuts dim 0 so), so
    that each rank reads from disk, and quantizes, only its own part. `gather` joins a tensor's
    parts from all indices along dim 0, in index order (a collective: a 4-bit layer's quant
    state needs its whole absmax). 4-bit weights whose rows do not split evenly
    (quant.rows_align), and checkpoints already in 4 bits, are read whole."""
    index: int
    count: int
    gather: Callable[[torch.Tensor], torch.Tensor]

    def rows(self, n: int) -> tuple[int, int]:
        size = -(-n // self.count)
        start = min(self.index * size, n)
        return start, min(start + size, n)


def prequantized_4bit(spec: ArchSpec) -> bool:
    qc = spec.raw.get("quantization_config") or {}
    return qc.get("quant_method") == "bitsandbytes" and bool(qc.get("load_in_4bit"))


def load_model(
    model_dir: str | Path,
    quant: QuantConfig | None = None,
    device: str | torch.device = "cpu",
    part: RowPart | None = None,
    only: Callable[[str], bool] | None = None,
    keys: dict[Path, list[str]] | None = None,
) -> DecoderLM | GenericLM:
    """Build the model of `model_dir`, quantizing its linears as `quant` says: a DecoderLM for a
    native family, else transformers' own model on the generic path (generic.py). `part`: read
    only those rows of each tensor (a native family's sharded run). `only`: read only the
    tensors whose checkpoint key it accepts, the others left on the meta device (a native
    family's model a part at a time: export/reference.py's streamed reference, which reads the
    rest later with read_weights). `keys`: read_weights'."""
    quant = quant or QuantConfig()
    if not is_native(read_config(model_dir)[0]):
        return load_generic(model_dir, quant, device)
    device = torch.device(device)
    spec = read_spec(model_dir)
    with torch.device("meta"):
        model = new_decoder(spec)
    model.name_or_path = str(model_dir)
    if spec.moe is not None:
        check_moe_quant(spec, quant, prequantized_4bit(spec), model_dir)
    experts_read = read_weights(model, model_dir, quant, device, part, only, keys)
    rebuild_rotary(model, spec, device)
    model.tie_weights()
    if only is None:
        check_nothing_missing(model, model_dir)
        _check_experts_complete(model, experts_read, model_dir)
    model.quant = quant
    return model.eval()


def read_weights(model: DecoderLM, model_dir: str | Path, quant: QuantConfig, device: torch.device,
                 part: RowPart | None = None, only: Callable[[str], bool] | None = None,
                 keys: dict[Path, list[str]] | None = None) -> dict[str, set]:
    """Read the checkpoint's tensors (those `only` accepts, where given) into `model`, whose
    modules for them are on the meta device: each linear of the blocks quantized as it is read.
    Returns the experts read, by stack (for _check_experts_complete). `keys`: model_dir's
    weights.shard_keys (each tensor in its one shard), where the caller has read them."""
    spec = model.spec
    dtype = quant.compute_dtype
    pending_4bit: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    prequant = prequantized_4bit(spec)
    experts_read: dict[str, set] = defaultdict(set)

    for path, names in (keys or shard_keys(model_dir)).items():
        handle = _open(path)
        for key in names:
            if IGNORED_KEYS.search(key) or (spec.tie_word_embeddings and key == "lm_head.weight"):
                continue
            if only is not None and not only(key):
                continue
            if spec.moe is not None:
                key_here = module_key(key)
                if _read_experts(model, key_here, lambda: _read(handle, path, key), quant, device,
                                 experts_read):
                    continue
                if key_here != key:  # Mixtral's block_sparse_moe.gate → mlp.gate
                    _set_tensor(model, key_here, _read(handle, path, key).to(device, dtype), path)
                    continue
            module_name, _, leaf = key.partition(".weight") if ".weight" in key else key.rpartition(".")
            if BLOCK_LINEAR.match(module_name) and key.startswith(module_name + ".weight"):
                if prequant:
                    suffix = key[len(module_name) + len(".weight"):]
                    pending_4bit[module_name][suffix] = _read(handle, path, key)
                elif part is not None:
                    _set_linear_part(model, module_name, handle, path, key, quant, device, part)
                else:
                    _set_linear(model, module_name, _read(handle, path, key), quant, device)
                continue
            tensor = _read(handle, path, key) if part is None else _read_part(handle, path, key,
                                                                               part)
            _set_tensor(model, key, tensor.to(device, dtype), path)
        del handle
        for module_name in list(pending_4bit):
            group = pending_4bit[module_name]
            if _is_complete_4bit(group):
                shape = spec.linear_shapes()[module_name.rsplit(".", 1)[-1]]
                layer = prequantized_linear(group, None, shape, quant, device)
                replace_keeping_bias(model, module_name, layer)
                del pending_4bit[module_name]
    if pending_4bit:
        raise QloraError(f"{model_dir}: 4-bit tensors incomplete for {sorted(pending_4bit)[:3]}; "
                         "the checkpoint is missing its quant_state keys")
    return experts_read


def check_moe_quant(spec: ArchSpec, quant: QuantConfig, prequant: bool, source) -> None:
    if quant.method == "int8":
        raise QloraError(f"{source}: quant int8 cannot hold a mixture of experts' expert "
                         "weights; use nf4 or fp4 (4-bit experts) or none (16-bit)")
    if prequant:
        raise QloraError(f"{source}: a checkpoint saved in 4 bits is not read for "
                         f"{spec.model_type} (its experts' layout differs between transformers "
                         "versions); load the 16-bit checkpoint, qlora quantizes it as it reads")


def _read_experts(model: nn.Module, key: str, read, quant: QuantConfig, device,
                  experts_read: dict[str, set]) -> bool:
    """Put an expert tensor (Hub per-expert linear, or a stack of them) in its ExpertLinear,
    quantizing it as it is read; False when `key` is not an expert tensor."""
    hub, stacked = HUB_EXPERT.match(key), STACKED_EXPERTS.match(key)
    if not hub and not stacked:
        return False
    if hub:
        layer, expert, name = hub.group(1), int(hub.group(2)), hub.group(3)
        projection, part = EXPERT_LINEARS[name]
        path = f"{layer}.mlp.experts.{projection}"
        _set_expert_part(model, path, expert, part, read(), quant, device)
        experts_read[path].add((expert, part))
        return True
    path = f"{stacked.group(1)}.mlp.experts.{stacked.group(2)}"
    tensor = read()
    module = _expert_linear(model, path)
    expected = (module.num_experts, module.out_features, module.in_features)
    if tuple(tensor.shape) != expected:
        raise QloraError(f"tensor {key} has shape {tuple(tensor.shape)} but config.json implies "
                         f"{expected}; config.json and weights disagree")
    rows = module.out_features // module.members
    for expert in range(module.num_experts):
        for part in range(module.members):
            _set_expert_part(model, path, expert, part, tensor[expert, part * rows:(part + 1) * rows],
                             quant, device)
            experts_read[path].add((expert, part))
    return True


def _expert_linear(model: nn.Module, path: str) -> ExpertLinear:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        module = None
    if not isinstance(module, ExpertLinear):
        raise QloraError(f"{path}: experts in a layer that config.json makes dense "
                         "(mlp_only_layers, decoder_sparse_step); config.json and weights disagree")
    return module


def _set_expert_part(model: nn.Module, path: str, expert: int, part: int, weight: torch.Tensor,
                     quant: QuantConfig, device) -> None:
    """Rows `part` of expert `expert`'s weight in the ExpertLinear at `path`: a member of its 4-bit
    stack, or rows of its 16-bit weight."""
    module = _expert_linear(model, path)
    rows = module.out_features // module.members
    if expert >= module.num_experts or tuple(weight.shape) != (rows, module.in_features):
        raise QloraError(f"{path}: expert {expert}'s weight has shape {tuple(weight.shape)} but "
                         f"config.json implies {module.num_experts} experts of "
                         f"{(rows, module.in_features)}; config.json and weights disagree")
    if quant.is_4bit:
        if module.quantized is None:
            module.set_quantized(QuantizedStack(module.num_experts * module.members,
                                                (rows, module.in_features), quant, device))
        module.quantized.set_member(expert * module.members + part, weight)
        return
    if module.weight.device.type == "meta":
        module.weight = nn.Parameter(torch.empty(module.weight.shape, device=device,
                                                 dtype=quant.compute_dtype), requires_grad=False)
    with torch.no_grad():
        module.weight[expert, part * rows:(part + 1) * rows] = weight.to(device, quant.compute_dtype)


def _check_experts_complete(model: nn.Module, experts_read: dict[str, set], source) -> None:
    for name, module in model.named_modules():
        if isinstance(module, ExpertLinear):
            missing = module.num_experts * module.members - len(experts_read.get(name, ()))
            if missing:
                raise QloraError(f"{source}: the checkpoint lacks {missing} expert weights of "
                                 f"{name} (config.json implies {module.num_experts} experts); "
                                 "a shard may be missing")


def _is_complete_4bit(group: dict[str, torch.Tensor]) -> bool:
    return "" in group and ".absmax" in group and any(k.startswith(".quant_state.") for k in group)


def _set_linear(model: nn.Module, name: str, weight: torch.Tensor, quant: QuantConfig, device):
    expected = tuple(model.get_submodule(name).weight.shape)
    if tuple(weight.shape) != expected:
        raise QloraError(f"tensor {name}.weight has shape {tuple(weight.shape)} but config.json "
                         f"implies {expected}; config.json and weights disagree")
    layer = quantize_linear(weight, None, quant, device)
    replace_keeping_bias(model, name, layer)


def _read_rows(handle, path: Path, key: str, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a tensor; safetensors reads only their bytes."""
    try:
        return handle.get_slice(key)[start:stop]
    except Exception as err:
        raise QloraError(f"{path}: tensor {key} cannot be read ({err}); the file is probably "
                         "truncated: download it again") from err


def _read_part(handle, path: Path, key: str, part: RowPart) -> torch.Tensor:
    """The tensor with only `part`'s rows read, the others zero."""
    shape = handle.get_slice(key).get_shape()
    if not shape:
        return _read(handle, path, key)
    start, stop = part.rows(shape[0])
    rows = _read_rows(handle, path, key, start, stop)
    whole = torch.zeros(shape, dtype=rows.dtype)
    whole[start:stop] = rows
    return whole


def _set_linear_part(model: nn.Module, name: str, handle, path: Path, key: str,
                     quant: QuantConfig, device, part: RowPart) -> None:
    out_features, in_features = tuple(model.get_submodule(name).weight.shape)
    if tuple(handle.get_slice(key).get_shape()) != (out_features, in_features) or \
            not rows_align(out_features, in_features, part.count, quant):
        _set_linear(model, name, _read(handle, path, key), quant, device)  # checks the shape
        return
    start, stop = part.rows(out_features)
    layer = quantize_linear_rows(_read_rows(handle, path, key, start, stop), start, out_features,
                                 quant, device, part.gather)
    replace_keeping_bias(model, name, layer)


def _set_tensor(model: nn.Module, key: str, tensor: torch.Tensor, path: Path) -> None:
    module_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise QloraError(f"{path}: tensor {key} has no place in a {model.spec.model_type} model; "
                         "is config.json from the same checkpoint?") from None
    old = getattr(module, attr, None)
    if not isinstance(old, torch.Tensor):
        raise QloraError(f"{path}: tensor {key} has no place in a {model.spec.model_type} model")
    if tuple(old.shape) != tuple(tensor.shape):
        raise QloraError(f"{path}: tensor {key} has shape {tuple(tensor.shape)} but config.json "
                         f"implies {tuple(old.shape)}; config.json and weights disagree")
    setattr(module, attr, nn.Parameter(tensor, requires_grad=False))


def read_model_spec(model_dir: str | Path) -> ArchSpec | GenericSpec:
    """The facts of a model directory without its weights: an ArchSpec for a native family, a
    GenericSpec (the model built empty by transformers) for anything else."""
    if is_native(read_config(model_dir)[0]):
        return read_spec(model_dir)
    return read_generic_spec(model_dir)


def load_tokenizer(model_dir: str | Path):
    """The model's tokenizer (tokenizer.json + tokenizer_config.json with its chat template)."""
    root = Path(model_dir)
    if not root.is_dir():
        raise QloraError(f"model directory {root} does not exist: pass --model an existing "
                         "directory in Hugging Face layout (config.json, *.safetensors, "
                         "tokenizer.json)")
    if not (root / "tokenizer.json").exists() and not (root / "tokenizer.model").exists():
        raise QloraError(f"no tokenizer.json in {root}: copy the tokenizer files of the base "
                         "model (tokenizer.json, tokenizer_config.json) into it")
    from transformers import PreTrainedTokenizerFast

    # tokenizer.json is the tokenizer (llama.cpp reads the same file); a model-specific class
    # from AutoTokenizer may rebuild parts of it (transformers 5's Qwen2Tokenizer replaces the
    # pre-tokenizer) or need remote code. tokenizer_config.json adds special tokens and the
    # chat template.
    if not (root / "tokenizer.json").exists():
        raise QloraError(f"{root} has only a SentencePiece tokenizer.model; save a fast tokenizer "
                         "(tokenizer.json) with transformers first: "
                         "AutoTokenizer.from_pretrained(dir).save_pretrained(dir)")
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(str(root))
    except Exception as err:  # a broken file surfaces as whichever error its reader hits first
        raise QloraError(f"the tokenizer in {root} cannot be read: {_broken_tokenizer_file(root, err)}; "
                         "copy the base model's tokenizer files (tokenizer.json, "
                         "tokenizer_config.json) into it again") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _broken_tokenizer_file(root: Path, err: Exception) -> str:
    """Which tokenizer file is not valid JSON, or what the tokenizer's reader said."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        path = root / name
        try:
            json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
        except ValueError as bad:
            return f"{path} is not valid JSON ({bad})"
    return f"{type(err).__name__}: {err}"


def load_generation_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "generation_config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def random_model(spec: ArchSpec, quant: QuantConfig, device: str | torch.device = "cpu",
                 seed: int = 0, std: float = 0.02) -> DecoderLM:
    """A DecoderLM with random weights in `spec`'s shape, quantized as `quant` says.

    Benchmarks use it: speed and memory do not depend on the values, and an 8B checkpoint need
    not be written and read back. Each linear is drawn on the device and quantized at once.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = new_decoder(spec)
    for name, module in list(model.named_modules()):
        if BLOCK_LINEAR.match(name):
            weight = torch.randn(module.weight.shape, generator=gen, device=device,
                                 dtype=quant.compute_dtype) * std
            _set_linear(model, name, weight, quant, device)
        if isinstance(module, ExpertLinear):  # drawn expert by expert: the stack never in 16 bits
            rows = module.out_features // module.members
            for expert in range(module.num_experts):
                for part in range(module.members):
                    weight = torch.randn((rows, module.in_features), generator=gen, device=device,
                                         dtype=quant.compute_dtype) * std
                    _set_expert_part(model, name, expert, part, weight, quant, device)
    for key, param in list(model.named_parameters()):
        if param.device.type != "meta":
            continue
        if key.endswith("norm.weight"):
            value = torch.ones(param.shape, device=device, dtype=quant.compute_dtype)
        else:
            value = torch.randn(param.shape, generator=gen, device=device,
                                dtype=quant.compute_dtype) * std
        _set_tensor(model, key, value, Path("<random>"))
    rebuild_rotary(model, spec, device)
    model.tie_weights()
    model.name_or_path = f"random-{spec.model_type}"
    model.quant = quant
    return model.eval()
