"""Reading a model's safetensors and putting its tensors into a model built on the meta device:
what the native loader (load.py) and the generic path (generic.py) share."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qlora.errors import QloraError


INDEX = "model.safetensors.index.json"


def index_weight_map(model_dir: str | Path) -> dict[str, str] | None:
    """The sharded checkpoint's index: tensor name → its shard's file name (None: no index)."""
    index = Path(model_dir) / INDEX
    if not index.exists():
        return None
    try:
        return json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as err:
        raise QloraError(f"{index} is not a valid safetensors index ({err})") from err


def weight_files(model_dir: str | Path, weight_map: dict[str, str] | None) -> list[Path]:
    """The safetensors files of a model directory, in shard order. `weight_map`: its index's
    (index_weight_map; None where it has none)."""
    root = Path(model_dir)
    index = root / INDEX
    if weight_map is not None:
        files = [root / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise QloraError(f"{index} names shards that are not in {root}: {', '.join(missing)}; "
                             "download the missing files")
        return files
    single = root / "model.safetensors"
    if single.exists():
        return [single]
    if any(root.glob("*.bin")) or any(root.glob("*.pth")):
        raise QloraError(f"{root} holds only pickle weights (*.bin/*.pth); convert them to "
                         "safetensors first (transformers: model.save_pretrained(dir, safe_serialization=True))")
    raise QloraError(f"no model.safetensors or model.safetensors.index.json in {root}")


def open_shard(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise QloraError(f"{path} cannot be read as safetensors ({err}); the file is probably "
                         "truncated or corrupt: download it again") from err


@dataclass(frozen=True)
class TensorHeader:
    """One tensor as its safetensors header states it."""

    file: Path
    shape: tuple[int, ...]


@dataclass(frozen=True)
class CheckpointHeaders:
    """Every tensor of a checkpoint, by the name its file gives it, in the shards' order (each
    in its key order, the order merge and export write them in); no tensor data read. A merge
    or an export reads them once (read_headers) and hands them to each of its steps."""

    model_dir: Path  # the folder they were read from
    tensors: dict[str, TensorHeader]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: h.shape for key, h in self.tensors.items()}

    def keys_by_file(self) -> dict[Path, list[str]]:
        """Each shard's tensor names, shard after shard."""
        out: dict[Path, list[str]] = {}
        for key, h in self.tensors.items():
            out.setdefault(h.file, []).append(key)
        return out


def read_shard_header(path: Path) -> dict[str, TensorHeader]:
    """Each tensor of one safetensors file → its header, in the file's key order."""
    with open_shard(path) as handle:
        return {key: TensorHeader(path, tuple(handle.get_slice(key).get_shape()))
                for key in handle.keys()}


def read_headers(model_dir: str | Path) -> CheckpointHeaders:
    """The headers of model_dir's safetensors shards (weight_files), each read once: every
    tensor once, from the one shard it is read from (one_copy_each)."""
    weight_map = index_weight_map(model_dir)
    headers = {path: read_shard_header(path) for path in weight_files(model_dir, weight_map)}
    kept = one_copy_each({path: list(h) for path, h in headers.items()}, weight_map, Path(model_dir))
    return CheckpointHeaders(Path(model_dir), {key: headers[path][key]
                                               for path, keys in kept.items() for key in keys})


def shard_keys(model_dir: str | Path) -> dict[Path, list[str]]:
    """Each shard's tensor names (its keys alone, no shapes: what a loader iterates), every
    tensor in the one shard it is read from (one_copy_each), shard after shard."""
    weight_map = index_weight_map(model_dir)
    keys = {}
    for path in weight_files(model_dir, weight_map):
        with open_shard(path) as handle:
            keys[path] = list(handle.keys())
    return one_copy_each(keys, weight_map, Path(model_dir))


def one_copy_each(keys: dict[Path, list[str]], weight_map: dict[str, str] | None,
                  model_dir: Path) -> dict[Path, list[str]]:
    """`keys` (each shard's tensor names, in shard order) with a tensor found in several shards
    kept in the last of them only, as transformers reads it (every tensor of every shard, a later
    copy over an earlier; it does not look the tensor up in the index). That is allowed where
    the index names that shard too, so that the two agree, or where the copies are the same
    bytes (any tool then reads the same values); where the index names another, or none, and
    the copies differ, the values loaded would depend on the tool that loads the checkpoint:
    refused. Shards left with no tensor are left out."""
    holders: dict[str, list[Path]] = {}
    for path, names in keys.items():
        for key in names:
            holders.setdefault(key, []).append(path)
    for key, files in holders.items():
        named = (weight_map or {}).get(key)
        if len(files) > 1 and named != files[-1].name and not copies_alike(key, files):
            said = f"the index names {named}" if named else "the index does not name it"
            raise QloraError(
                f"{model_dir}: tensor {key} is in {len(files)} shards "
                f"({', '.join(f.name for f in files)}) with different values and {said}; "
                f"transformers reads the copy in {files[-1].name}. Remove the other copies, or "
                f"make {INDEX}'s weight_map name the shard whose copy is meant")
    kept = {path: [key for key in names if holders[key][-1] == path] for path, names in keys.items()}
    return {path: names for path, names in kept.items() if names}


COMPARE_CHUNK_BYTES = 64 * 2**20  # a copy may be GiBs (an embedding): compared a chunk at a time


def copies_alike(key: str, files: list[Path]) -> bool:
    """Whether `key`'s copies in these safetensors files have one dtype, shape and the same
    bytes (read from the files a chunk at a time, no tensor made)."""
    spans = [stored_span(path, key) for path in files]
    if len({(dtype, shape, end - start) for dtype, shape, start, end in spans}) > 1:
        return False
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(open(path, "rb")) for path in files]
        for handle, (_, _, start, _) in zip(handles, spans):
            handle.seek(start)
        left = spans[0][3] - spans[0][2]
        while left > 0:
            chunks = [handle.read(min(left, COMPARE_CHUNK_BYTES)) for handle in handles]
            if any(chunk != chunks[0] for chunk in chunks[1:]):
                return False
            left -= len(chunks[0])
    return True


def stored_span(path: Path, key: str) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, first byte, end byte) of `key`'s data in a safetensors file: its header is
    8 bytes of length (little-endian), that much JSON, then the data its offsets count from."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        entry = json.loads(handle.read(length))[key]
    start, end = entry["data_offsets"]
    return entry["dtype"], tuple(entry["shape"]), 8 + length + start, 8 + length + end


def headers_of(model_dir: str | Path, headers: CheckpointHeaders | None) -> CheckpointHeaders:
    """model_dir's headers: `headers` where the caller read them (those of another folder would
    pass every check of the same shapes and have its tensors read: refused), else read now."""
    if headers is None:
        return read_headers(model_dir)
    if headers.model_dir.resolve() != Path(model_dir).resolve():
        raise ValueError(f"headers read from {headers.model_dir} given for {model_dir}")
    return headers


def read_tensor(handle, path: Path, key: str) -> torch.Tensor:
    try:
        return handle.get_tensor(key)
    except Exception as err:
        raise QloraError(f"{path}: tensor {key} cannot be read ({err}); the file is probably "
                         "truncated: download it again") from err


def replace_keeping_bias(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent_name, leaf = name.rsplit(".", 1)
    parent = model.get_submodule(parent_name)
    old = getattr(parent, leaf)
    # a bias read before its weight already sits on the old module; an unread one is still meta
    layer.bias = old.bias if old.bias is not None else None
    setattr(parent, leaf, layer)


def check_nothing_missing(model: nn.Module, model_dir, skip: str | None = None) -> None:
    """Every parameter was read (none left on the meta device), but those whose name starts
    with `skip` (a streamed model's layers, read later)."""
    missing = [n for n, p in model.named_parameters()
               if p.device.type == "meta" and not (skip and n.startswith(skip))]
    if missing:
        raise QloraError(f"{model_dir}: the checkpoint lacks {len(missing)} tensors the config "
                         f"implies (e.g. {', '.join(missing[:3])}); a shard may be missing")
