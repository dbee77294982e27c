"""The package layout is the architecture: data flows one way, so a module may import only from
its own layer or the layers below it, and nothing imports in a cycle. Parsed from the source
(every ``import`` statement, including those inside functions and ``TYPE_CHECKING`` blocks), so
a lazy import cannot hide an upward edge."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kltrain"

#: Bottom to top. A module in layer i may import from layers 0..i.
LAYERS: list[tuple[str, ...]] = [
    ("kltrain",),  # the package root: version only
    ("kltrain.divergence", "kltrain.rl"),  # pure tensor math: no models, config or I/O
    ("kltrain.config",),
    (
        "kltrain.models",
        "kltrain.data",
        "kltrain.prompt_length",
        "kltrain.rewards",
        "kltrain.objective",
    ),
    ("kltrain.rollout",),
    ("kltrain.algorithms", "kltrain.evaluation"),  # evaluation: held-out metrics of a policy
    ("kltrain.training",),
    ("kltrain.experiments",),
    ("kltrain.cli", "kltrain.__main__", "kltrain.preflight"),  # preflight: what validate checks
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, name: str) -> set[str]:
    """Every kltrain module ``path`` imports (``from x import y`` counts as ``x.y`` when that is
    a module, else ``x``)."""
    known = modules()
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "kltrain"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "kltrain":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    out.discard(name)
    return out


def layer_of(name: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            inside = name == prefix or name.startswith(prefix + ".")
            if inside and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    assert best is not None, f"{name} is in no layer: add it to LAYERS in {__file__}"
    return best[0]


def graph() -> dict[str, set[str]]:
    return {name: imports_of(path, name) for name, path in modules().items()}


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_no_module_imports_from_a_layer_above_it():
    upward = [
        f"{src} (layer {layer_of(src)}) imports {dst} (layer {layer_of(dst)})"
        for src, targets in graph().items()
        for dst in sorted(targets)
        if layer_of(dst) > layer_of(src)
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path a → b → … → a, or None (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    # A package's __init__ re-exporting its submodules is not a cycle with them.
    edges = {
        src: {
            d for d in dst if not (src.startswith(d + ".") and modules()[d].name == "__init__.py")
        }
        for src, dst in graph().items()
    }
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_the_checks_can_fail():
    """The cycle finder and the layer rule catch what they are meant to catch."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("kltrain.divergence.functions") < layer_of("kltrain.config")
    assert layer_of("kltrain.training.trainer") > layer_of("kltrain.algorithms.ppo")


@pytest.mark.parametrize("pure", ["kltrain.divergence", "kltrain.rl"])
def test_pure_math_imports_no_models_config_or_io(pure):
    banned = ("transformers", "accelerate", "datasets", "peft", "wandb", "yaml", "pydantic")
    for name, path in modules().items():
        if not (name == pure or name.startswith(pure + ".")):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            roots = []
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                roots = [node.module.split(".")[0]]
            assert not set(roots) & set(banned), f"{name} imports {roots}"
