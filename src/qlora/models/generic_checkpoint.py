"""The generic path's checkpoint names: where each stored tensor of a checkpoint goes in the
transformers model it is loaded into (models/generic.py), as transformers' own loader decides.

A stored name is renamed as transformers renames it (its rename_source_key over the model's
conversion mapping: GPT-NeoX's "embed_out" → "lm_head", multimodal Gemma 3's prefixes), placed
with or without the base model's prefix, or left unread where transformers leaves it unread.
Tensors that transformers converts rather than renames are grouped by the parameter they make,
and only conversions that stack a layer's experts into one 3D parameter (Qwen2-MoE's, OLMoE's)
are taken: `convert_sources` runs transformers' own WeightConverter over a parameter's tensors
once all of them are read. Any other conversion (a fused tensor split into linear layers) is
refused by name.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import torch

from qlora.errors import QloraError


class SourceMatch(NamedTuple):
    """A stored tensor that one of transformers' WeightConverters turns into part of a model
    parameter as it loads (one expert's weight, stacked with the others into a 3D one)."""
    converter: object  # transformers' WeightConverter, from the model's conversion mapping
    pattern: str  # which of its source patterns the tensor matches ("mlp.experts.*.up_proj...")
    renamed: str  # the tensor's name after transformers' renamings, before the converter's


class Conversion(NamedTuple):
    """One model parameter made from several stored tensors, and transformers' converter that
    makes it."""
    converter: object  # transformers' WeightConverter (a prototype: each use takes a copy)
    sources: dict[str, str]  # stored tensor name → the converter's source pattern it matches


class ReadPlan(NamedTuple):
    """How a checkpoint's tensors become the model's parameters."""
    # stored name → model name; None: unread; a converted tensor: its own name in the model's
    # terms (an expert's "model.layers.0.mlp.experts.3.up_proj.weight", as the Hub stores it)
    names: dict[str, str | None]
    conversions: dict[str, Conversion]  # model parameter → the stored tensors converted into it


def checkpoint_names(hf, keys, source: str = "the checkpoint") -> dict[str, str | None]:
    """Each tensor name of a checkpoint → its name in the model (read_plan's names)."""
    return read_plan(hf, keys, source).names


def read_plan(hf, keys, source: str = "the checkpoint") -> ReadPlan:
    """Where each tensor of a checkpoint goes in the model: its name there, None for a tensor
    that transformers too leaves unread (an old causal-mask buffer, a stored rotary table), or
    the parameter it is converted into.

    A name is first renamed as transformers renames it when it loads (transformers_renamer:
    GPT-NeoX's "embed_out" → "lm_head", multimodal Gemma 3's "language_model.model." →
    "model.language_model."); a checkpoint of the base model alone names its tensors without
    the head's prefix ("h.0.attn.c_attn.weight" for GPT-2's "transformer.h.0.attn.c_attn.weight"):
    the prefix is added. Tensors transformers converts (each expert's weights, which it stacks
    into one 3D parameter per projection: Qwen2-MoE's, OLMoE's) are grouped by the parameter
    they make. A name that still has no place is refused before anything is read."""
    expected = set(hf.state_dict())
    ignored = [re.compile(p) for p in (getattr(hf, "_keys_to_ignore_on_load_unexpected", None)
                                       or ())] + [re.compile(r"rotary_emb\.inv_freq$")]
    rename = transformers_renamer(hf)
    names: dict[str, str | None] = {}
    conversions: dict[str, Conversion] = {}
    stored_as: dict[str, str] = {}  # model name → the stored name that fills it
    for stored in keys:
        key, match = rename(stored)
        placed = _placed(key, expected, hf.base_model_prefix)
        if placed is not None and match is not None:
            refuse_unstacked_conversion(hf, stored, placed, match, source)
            names[stored] = _placed_like(match.renamed, key, placed)
            conversions.setdefault(placed, Conversion(match.converter, {})).sources[stored] = \
                match.pattern
        elif placed is not None:
            names[stored] = placed
        elif any(p.search(stored) or p.search(key) for p in ignored):
            names[stored] = None
        else:
            raise QloraError(
                f"{source}: tensor {stored} has no place in a {hf.config.model_type} model "
                f"({type(hf).__name__}); is config.json from the same checkpoint? A checkpoint "
                "in an older layout can be re-saved with transformers' save_pretrained first")
        name = names[stored]
        if name is not None and stored_as.setdefault(name, stored) != stored:
            raise QloraError(f"{source}: tensors {stored_as[name]} and {stored} both name the "
                             f"model's {name}; keep one of them")
    for target, conversion in conversions.items():
        if target in stored_as:
            raise QloraError(f"{source}: tensor {stored_as[target]} is the model's {target}, which "
                             f"{next(iter(conversion.sources))} and others make too (one expert "
                             "each); keep one layout of the experts")
    return ReadPlan(names, conversions)


def refuse_unstacked_conversion(hf, stored: str, placed: str, match: "SourceMatch",
                                source: str) -> None:
    """Only conversions that stack tensors into one non-linear parameter (a layer's experts
    into a 3D one) are run here: one that splits a tensor into several parameters, or makes a
    linear layer's weight (which the loader quantizes as it reads it), is refused."""
    one_target = len(match.converter.target_patterns) == 1
    if one_target and hf.get_parameter(placed).dim() == 3:
        return
    raise QloraError(
        f"{source}: tensor {stored} is one of the tensors transformers converts as it loads a "
        f"{hf.config.model_type} model (into {placed}{'' if one_target else ' and others'}), a "
        "conversion qlora's generic path does not do (it stacks experts only); this model "
        "cannot be trained here")


def _placed(key: str, expected: set[str], prefix: str) -> str | None:
    """The model's name for a (renamed) key: itself, with the base model's prefix added (a
    checkpoint of the base model alone) or with it taken off; None where none of them exists."""
    if key in expected:
        return key
    if prefix and f"{prefix}.{key}" in expected:
        return f"{prefix}.{key}"
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in expected:
        return key[len(prefix) + 1:]
    return None


def _placed_like(name: str, key: str, placed: str) -> str:
    """`name` with the prefix that placing `key` at `placed` added or took off."""
    if placed == key:
        return name
    if placed.endswith(key):
        return placed[:-len(key)] + name
    return name.removeprefix(key[:-len(placed)])


def transformers_renamer(hf):
    """key → (its name after the renamings and the conversion transformers applies when it loads
    this model, a SourceMatch where one of its converters takes the tensor, else None):
    transformers' own rename_source_key over the model's conversion mapping (transformers 5);
    names unchanged on a transformers without one."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (WeightConverter, WeightRenaming,
                                                     rename_source_key)
    except ImportError:
        # transformers 4 (4.52 on) renames by a class's regex map (multimodal Gemma 3's)
        legacy = getattr(hf, "_checkpoint_conversion_mapping", None) or {}

        def rename_legacy(key: str) -> tuple[str, SourceMatch | None]:
            for pattern, target in legacy.items():
                key, hits = re.subn(pattern, target, key, count=1)
                if hits:
                    break
            return key, None

        return rename_legacy
    mapping = get_model_conversion_mapping(hf)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}

    def rename(key: str) -> tuple[str, SourceMatch | None]:
        renamed, pattern = rename_source_key(key, renamings, converters)
        if pattern is None:
            return renamed, None
        before, _ = rename_source_key(key, renamings, [])
        return renamed, SourceMatch(by_pattern[pattern], pattern, before)

    return rename


def convert_sources(hf, target: str, conversion: Conversion, tensors: dict[str, torch.Tensor],
                    path: Path | str = "the checkpoint") -> dict[str, torch.Tensor]:
    """The parameters transformers makes of `tensors` (all the stored tensors of `conversion`,
    emptied as they are handed over), by its own WeightConverter: given them as its loader gives
    them, in its natural order of the names (expert 10 after expert 9), then run."""
    from copy import deepcopy

    from transformers.core_model_loading import dot_natural_key

    converter = deepcopy(conversion.converter)  # as transformers: each parameter its own copy
    for stored in sorted(tensors, key=dot_natural_key):
        converter.add_tensor(target, stored, conversion.sources[stored], tensors.pop(stored))
    try:
        return converter.convert(target, model=hf, config=hf.config)
    except (RuntimeError, ValueError) as err:
        raise QloraError(f"{path}: transformers' conversion of {len(conversion.sources)} tensors "
                         f"(e.g. {next(iter(conversion.sources))}) into {target} failed ({err}); "
                         "does every expert have all its weights, of the shapes config.json "
                         "implies?") from err
