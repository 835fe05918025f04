"""The layers of src/qlora: who may import whom.

Every module under src/qlora is parsed with `ast`; every import is read, at module level and inside
functions alike (a lazy import is still a dependency). A package's __init__ is a module of its own
(`qlora.data` is data/__init__.py). `from qlora.kernels import lora_dropout` depends on the module
qlora.kernels.lora_dropout; `from qlora.data import IGNORE` on qlora.data.

The layers, lowest first; a module may import from its own layer and the layers below, never from
a layer above:

    base       qlora (the package's __init__), errors, files, device
    quant      quant
    models     models and models.*                                -- the one reference model
    kernels    kernels and kernels.*                                -- fused kernels over the model
    adapters   adapters
    speed      speed and speed.*                                    -- fast paths applied from outside
    data       data and data.*
    methods    methods and methods.*                                -- what a preference batch's loss is
    memory     memory (the planner: arithmetic on an ArchSpec and PlanConfig)
    config     config (RunConfig; spells the options)
    evaluate   infer, chat, eval
    train      train and train.*
    apps       merge, export and export.*, compare, demo, tiny
    cli        cli

One change from the order first proposed (infer, chat and eval in the application layer above
train): training validates with eval's loss_sums/perplexity_of, the same numbers `qlora eval`
reports, so that one definition of the validation loss serves both. eval builds on infer and chat
(generation for its metrics) and none of the three imports train, config or the planner; they form
their own layer just below train.

Three rules, each test printing the imports that break it:
(a) nothing in qlora/models/ imports adapters, speed, train, config, memory, kernels, data or any
    layer above models: the reference model knows nothing of what is applied to it;
(b) no import cycle among qlora modules;
(c) no module imports from a layer above its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("qlora", "qlora.errors", "qlora.files", "qlora.device")),
    ("quant", ("qlora.quant",)),
    ("models", ("qlora.models",)),
    ("kernels", ("qlora.kernels",)),
    ("adapters", ("qlora.adapters",)),
    ("speed", ("qlora.speed",)),
    ("data", ("qlora.data",)),
    ("methods", ("qlora.methods",)),
    ("memory", ("qlora.memory",)),
    ("config", ("qlora.config",)),
    ("evaluate", ("qlora.infer", "qlora.chat", "qlora.eval")),
    ("train", ("qlora.train",)),
    ("apps", ("qlora.merge", "qlora.export", "qlora.compare", "qlora.demo", "qlora.tiny")),
    ("cli", ("qlora.cli",)),
]
MODELS_MAY_NOT_IMPORT = ("qlora.adapters", "qlora.speed", "qlora.train", "qlora.config",
                         "qlora.memory", "qlora.kernels", "qlora.data")


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module under src/qlora (a package's __init__ by its package's name)."""
    out = {}
    for path in sorted((SRC / "qlora").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(mods: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(importer, imported qlora module, line) for every import of a qlora module, at any depth."""
    edges = []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from .x import y
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                # `from pkg import sub` depends on the module pkg.sub; `from pkg import name` on pkg
                subs = [f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in mods]
                targets = subs if len(subs) == len(node.names) else [module, *subs]
            else:
                continue
            for target in targets:
                while target and target not in mods:  # `import qlora.x.y` of a name inside a module
                    target = target.rpartition(".")[0]
                if target and target != name and (target == "qlora" or target.startswith("qlora.")):
                    edges.append((name, target, node.lineno))
    return sorted(set(edges))


def layer_of(module: str) -> int:
    best, index = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, index = len(prefix), i
    assert index is not None, f"{module} is in no layer: add it to LAYERS in tests/test_layers.py"
    return index


def _where(mods, importer: str, line: int) -> str:
    return f"{mods[importer].relative_to(SRC.parent)}:{line}"


def test_every_module_has_a_layer():
    for module in modules():
        layer_of(module)


def test_models_import_nothing_applied_to_them():
    mods = modules()
    bad = [f"{_where(mods, a, line)}: {a} imports {b} (the model layer may not import "
           f"{next(p for p in MODELS_MAY_NOT_IMPORT + (b,) if b == p or b.startswith(p + '.'))})"
           for a, b, line in imports(mods)
           if a.startswith("qlora.models") and (
               any(b == p or b.startswith(p + ".") for p in MODELS_MAY_NOT_IMPORT)
               or layer_of(b) > layer_of(a))]
    print("\n".join(bad))
    assert not bad, "qlora/models imports what it may not:\n" + "\n".join(bad)


def test_no_import_cycles():
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for a, b, _ in imports(mods):
        graph[a].add(b)
    # Tarjan's strongly connected components: every component of more than one module is a cycle.
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    lines = []
    for component in components:
        lines.append("cycle among " + ", ".join(component) + ":")
        lines += [f"  {_where(mods, a, line)}: {a} imports {b}" for a, b, line in imports(mods)
                  if a in component and b in component]
    print("\n".join(lines))
    assert not components, "import cycles:\n" + "\n".join(lines)


def test_no_upward_imports():
    mods = modules()
    bad = [f"{_where(mods, a, line)}: {a} (layer {LAYERS[layer_of(a)][0]}) imports {b} "
           f"(layer {LAYERS[layer_of(b)][0]}, above it)"
           for a, b, line in imports(mods) if layer_of(b) > layer_of(a)]
    print("\n".join(bad))
    assert not bad, "imports from a layer above:\n" + "\n".join(bad)
