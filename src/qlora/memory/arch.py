"""The architecture the planner reads: the model layer's ArchSpec (models/spec.py), from a model
directory, a config.json or a named shape (`qlora plan --shape`: models/spec.NAMED_SHAPES); a
model of no native family gives a GenericSpec (models/generic.py), which generic.coarse_plan
estimates coarsely."""

from __future__ import annotations

import json
from pathlib import Path

from qlora.errors import QloraError
from qlora.models.generic import GenericSpec
from qlora.models.generic import spec_from_config as generic_spec_from_config
from qlora.models.spec import NAMED_SHAPES as SHAPES  # (benchmarks read memory.SHAPES)
from qlora.models.spec import ArchSpec, is_native, spec_from_config, spec_from_shape

# the families whose peaks were measured on the GPU (docs/MEMORY.md): Llama's block
CALIBRATED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def arch_from_config(config: dict, name: str = "model", source: str = "config.json") -> ArchSpec:
    """The ArchSpec of a config.json dict, read by the model layer's own parser (models/spec.py),
    which refuses unknown families; what is missing is named."""
    try:
        return spec_from_config(config, source=source, name=name)
    except KeyError as err:
        raise QloraError(f"{source}: missing {err.args[0]!r}, needed to plan memory") from None


def resolve_arch(model_dir: str | None = None, config_json: str | None = None,
                 shape: str | None = None) -> ArchSpec | GenericSpec:
    """Exactly one of: a model directory, a config.json path, a named shape. A model that is not
    of a native family gives a GenericSpec, which plan() estimates coarsely."""
    given = [x for x in (model_dir, config_json, shape) if x]
    if len(given) != 1:
        raise QloraError("give exactly one of --model DIR, --config-json FILE, --shape NAME")
    if shape:
        if shape.lower() not in SHAPES:
            raise QloraError(f"--shape {shape!r} is not known; known shapes: {', '.join(SHAPES)}")
        if not is_native(SHAPES[shape.lower()]):  # a generic-path shape (stablelm-2-1.6b)
            return generic_spec_from_config(SHAPES[shape.lower()], source=f"shape {shape.lower()}",
                                            name=shape.lower())
        return spec_from_shape(shape)
    path = Path(config_json) if config_json else Path(model_dir) / "config.json"
    if not path.is_file():
        what = "--config-json" if config_json else "--model"
        raise QloraError(f"{what}: {path} does not exist (expected a Hugging Face config.json)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise QloraError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    name = Path(model_dir).name if model_dir else path.parent.name or path.stem
    if isinstance(config, dict) and not is_native(config):
        # the generic path: the model transformers builds, empty, read for its layers and sizes
        return generic_spec_from_config(config, source=str(path), name=name)
    return arch_from_config(config, name=name, source=str(path))
