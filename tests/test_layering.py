"""docs/ARCHITECTURE.md lists the engine's bands top to bottom; the code must keep to them."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rooms() -> list[str]:
    """The module rows of the table, top to bottom, as dotted names (a folder row ends in '.')."""
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    rows = re.findall(r"^\| `(tlcore/[^`]+)` \|", doc, flags=re.M)
    return [row.removesuffix(".py").replace("/", ".") for row in rows]


def _room_of(module: str, rooms: list[str]) -> int | None:
    """The row a module belongs to: its own row, else the deepest folder row holding it."""
    if module in rooms:
        return rooms.index(module)
    folders = [i for i, r in enumerate(rooms) if r.endswith(".") and (module + ".").startswith(r)]
    return max(folders, key=lambda i: len(rooms[i]), default=None)


def _is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _tlcore_imports(path: Path) -> set[str]:
    """The tlcore modules `path` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tlcore"):
            # `from tlcore.data import pipeline` imports the module `tlcore.data.pipeline`.
            submodules = [f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")]
            found.update(submodules or [node.module])
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tlcore"))
    return found


def test_every_engine_module_imports_only_rows_above_its_own():
    rooms = _rooms()
    modules = {}
    for path in sorted((ROOT / "tlcore").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if path.name == "__main__.py" or (path.name == "__init__.py" and not _tlcore_imports(path)):
            continue  # `python -m tlcore` stands above every room; an empty package holds nothing
        modules[name.removesuffix(".__init__")] = path
    unlisted = [m for m in modules if _room_of(m, rooms) is None]
    assert not unlisted, f"modules without a row in docs/ARCHITECTURE.md: {unlisted}"
    upward = []
    for module, path in modules.items():
        mine = _room_of(module, rooms)
        for target in _tlcore_imports(path):
            theirs = _room_of(target, rooms)
            if theirs is not None and theirs > mine:
                upward.append(f"{module} imports {target}")
    assert not upward, "imports that go up the table: " + "; ".join(upward)


def test_every_engine_module_is_described_in_its_bands_table():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    described = set()
    for band, table in re.findall(r"^### `(tlcore/[^`]+/)`\n\n(.*?)(?:\n\n|\Z)", doc, flags=re.M | re.S):
        described.update(band + name for name in re.findall(r"^\| `([a-z_]+\.py)` \|", table, flags=re.M))
    files = {str(p.relative_to(ROOT)) for p in (ROOT / "tlcore").glob("*/*.py") if p.name != "__init__.py"}
    assert files - described == set(), f"modules without a row in their band's table: {sorted(files - described)}"
    assert described - files == set(), f"rows for modules that do not exist: {sorted(described - files)}"
