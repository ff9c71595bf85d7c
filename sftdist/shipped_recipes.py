"""The recipes shipped inside the package (`sftdist/recipes/*.yaml`): `sftdist recipes` lists them and
`sftdist recipes copy NAME DEST` copies one, so that a pip install has them as a clone does (the
clone's top-level `recipes/` is a link to the same folder: one copy of each file)."""

from __future__ import annotations

import difflib
from pathlib import Path

from sftdist.errors import UserError
from sftdist.rundir import write_text_atomic

RECIPES_DIR = Path(__file__).parent / "recipes"


def shipped() -> dict[str, Path]:
    """Name (the file name without .yaml) -> path, sorted by name."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def summary(path: Path) -> str:
    """The first line of a recipe's comment header: what it trains, and where."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def find(name: str) -> Path:
    """The shipped recipe `name` (with or without .yaml); a UserError naming the shipped ones otherwise."""
    recipes = shipped()
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if stem in recipes:
        return recipes[stem]
    near = difflib.get_close_matches(stem, list(recipes), n=1, cutoff=0.5)
    hint = f"did you mean '{near[0]}'? " if near else ""
    raise UserError(f"no shipped recipe '{name}'; {hint}shipped: {', '.join(recipes)} (sftdist recipes lists them)")


def copy(name: str, dest: str) -> Path:
    """Copy a shipped recipe to `dest` (a file, or a directory to put NAME.yaml in); never over a file."""
    src = find(name)
    target = Path(dest)
    if target.is_dir():
        target = target / src.name
    if target.exists():
        raise UserError(f"{target}: already exists; choose another destination (nothing was copied)")
    if not target.parent.is_dir():
        raise UserError(f"{target.parent}: no such directory (nothing was copied)")
    write_text_atomic(target, src.read_text(encoding="utf-8"))
    return target
