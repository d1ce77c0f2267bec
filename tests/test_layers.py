"""The package's rooms and the direction of their imports (docs/architecture.md).

Read from the source with `ast` (nothing is imported), so a new import that runs against
the layering fails here, named, before it tangles the graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first: a room may import its own modules and the rooms before it, never after.
ROOMS = (
    "constants",
    "configs",
    "models",
    "data",
    "reporting",
    "evaluation",
    "training",
    "inference",
    "benchmarks",
    "cli",
)
# ``python -m tfcovseg.<command>`` doors: they only hand over to `tfcovseg.cli`.
DOORS = ("train", "evaluate", "export", "predict", "compare", "serving_client", "summary")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_main_guard(node) -> bool:
    test = getattr(node, "test", None)
    return (
        isinstance(node, ast.If)
        and isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
    )


def _imports(tree):
    """Every module an import statement names (also inside functions: lazy imports count),
    except under ``if __name__ == "__main__":`` (a module's own ``python -m`` door)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_main_guard(node):
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))


def _room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "tfcovseg" or len(parts) < 2:
        return None  # the package root (__version__, require_tensorflow): any room uses it
    return parts[1] if parts[1] in ROOMS or parts[1] in DOORS else None


def _edges(package: str):
    for path in sorted((ROOT / package).rglob("*.py")):
        module = _module(path)
        for target in _imports(ast.parse(path.read_text(), str(path))):
            yield module, target


def test_every_module_lives_in_a_room_or_is_a_door():
    loose = [
        _module(p)
        for p in (ROOT / "tfcovseg").glob("*.py")
        if p.stem not in ("__init__", "constants") + DOORS
    ]
    assert loose == [], f"modules outside the rooms: {loose}"


def test_rooms_import_only_rooms_below_them():
    wrong = []
    for module, target in _edges("tfcovseg"):
        source, used = _room(module), _room(target)
        if source is None or used is None or source == used:
            continue
        if source in DOORS:
            if used != "cli":
                wrong.append(f"{module} -> {target} (a door hands over to tfcovseg.cli only)")
        elif used in DOORS or ROOMS.index(used) > ROOMS.index(source):
            wrong.append(f"{module} -> {target}")
    assert wrong == [], "imports against the layering:\n" + "\n".join(sorted(set(wrong)))


def test_conversion_never_imports_the_package_above_it():
    wrong = [f"{m} -> {t}" for m, t in _edges("data_tools") if t.split(".")[0] == "tfcovseg"]
    assert wrong == []


@pytest.mark.parametrize(
    "module, target, expected",
    [
        ("tfcovseg.evaluation.run", "tfcovseg.inference.export", False),
        ("tfcovseg.training.trainer", "tfcovseg.evaluation.metrics", True),
        ("tfcovseg.train", "tfcovseg.cli.train", True),
        ("tfcovseg.train", "tfcovseg.training.trainer", False),
    ],
)
def test_the_checker_tells_allowed_from_wrong(module, target, expected):
    source, used = _room(module), _room(target)
    if source in DOORS:
        allowed = used == "cli"
    else:
        allowed = used not in DOORS and ROOMS.index(used) <= ROOMS.index(source)
    assert allowed is expected
