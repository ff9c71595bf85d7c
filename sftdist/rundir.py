"""The files sftdist writes, and the two ways it writes them so that a crash never leaves a result
that looks whole.

- A single file is written beside its final name and renamed over it (`write_text_atomic`).
- A directory (a cache entry, the final model, an export, a merged model, the tiny model) is built
  in a hidden sibling and renamed into place when complete (`build_beside`); a build that dies
  leaves only that hidden sibling, which the next build in the same place removes.
- A directory that others write into in place (a checkpoint, written by every rank through the
  Trainer) carries a manifest of its files and sizes (`write_manifest`), checked before it is used
  (`check_manifest`).
- The run's recipe and prompt style (`RUN_FILES`) go into every model directory the run writes, and
  on into its exports (`copy_run_files`), so that each of them renders prompts as training did.

A leaf module: every writer imports it, and it imports nothing of sftdist but errors.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sftdist.errors import UserError

RECIPE_FILE = "sftdist_recipe.yaml"  # the resolved recipe, in output_dir and beside every model it writes
PROMPT_FILE = "sftdist_prompt.json"  # how the run's prompts are rendered (prompt_style.py)
RUN_FILES = (RECIPE_FILE, PROMPT_FILE)  # what travels with every model of a run: checkpoints, final/, exports
MANIFEST = "sftdist_manifest.json"  # {relative path: size in bytes} of every file of a directory
COMPLETE_MARKER = "sftdist_complete"  # a checkpoint every rank has finished (written after the manifest)
FINAL_DIR = "final"
RUN_INFO = "sftdist_run.json"  # written last, once final/ is in place: the run is finished
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
FSDP_SHARDS = "pytorch_model_fsdp_0"  # accelerate's folder of FSDP SHARDED_STATE_DICT model shards
ADAPTER_CONFIG = "adapter_config.json"  # peft's
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's
TRAINER_STATE = "trainer_state.json"  # the Trainer's
# Tokenizer files that decide the tokens.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
GENERATION_CONFIG = "generation_config.json"  # transformers': the EOS ids that end a generation
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?P<host>[^-]+)-(?P<pid>\d+)$")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def _host() -> str:
    return socket.gethostname().replace("-", "_")  # no '-': it separates host and pid in a partial's name


def _alive_here(host: str, pid: int) -> bool:
    """Whether the build that named a partial directory may still be running (a pid on another host might)."""
    if host != _host():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(parent: Path, name: str | None = None) -> None:
    """Remove hidden build directories in `parent` (of `name` only, when given) whose builder is gone."""
    if not parent.is_dir():
        return
    for p in parent.iterdir():
        m = _PARTIAL.match(p.name)
        if m and (name is None or m["name"] == name) and not _alive_here(m["host"], int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True)


def partial_path(dest: Path, shared_by: str | None = None) -> Path:
    """The hidden sibling `dest` is built in: this process's, or one that every rank of a run names
    alike (`shared_by`, e.g. "ranks": the final model, which all ranks save together)."""
    return dest.parent / f".{dest.name}.partial-{shared_by or f'{_host()}-{os.getpid()}'}"


@contextlib.contextmanager
def build_beside(dest: Path, replace: bool = False, shared_by: str | None = None) -> Iterator[Path]:
    """Yield a new hidden sibling of `dest` to build in; on success rename it to `dest` in one step.

    `dest` may be absent or an empty directory; with `replace`, an existing `dest` is removed first
    (a rebuilt cache entry, the final model, the tiny model). On any failure the sibling is removed
    and `dest` is left as it was. Leftovers of builds that died are removed first.
    """
    created = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]  # deepest first
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(dest.parent, dest.name)
    tmp = partial_path(dest, shared_by)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if dest.is_dir() and not dest.is_symlink() and (replace or not any(dest.iterdir())):
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # the parents this build made, while nothing else was put in them
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def check_new_dir(dest: Path, what: str) -> None:
    """Refuse, before any work, a `dest` that `build_beside` could not fill: a file or a non-empty
    directory, a mount point (the final rename onto it fails with EBUSY), or a place this process
    cannot write in (a read-only file system, no permission), or a symbolic link (the rename would
    fail on it, or replace the link rather than fill what it points to)."""
    if dest.is_symlink():
        raise UserError(
            f"{what} {dest}: is a symbolic link (to {os.readlink(dest)}), which the result (built beside it, then "
            "renamed) cannot fill; pass the directory it points to, or a new one"
        )
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(f"{what} {dest}: exists and is not empty; choose a new directory")
    if dest.is_dir() and os.path.ismount(dest):
        raise UserError(
            f"{what} {dest}: is a mount point, which the result (built beside it, then renamed) cannot replace; "
            "choose a new directory inside it"
        )
    check_writable_place(dest, what)


def check_writable_place(dest: Path, what: str) -> None:
    """Refuse a `dest` (file or directory) that this process cannot create: its nearest existing parent is
    not a directory, not writable, or on a read-only file system."""
    parent = next(p for p in (dest.parent, *dest.parent.parents) if p.exists())
    if not (parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)):
        why = "not a directory" if not parent.is_dir() else "permission denied"
        if parent.is_dir() and os.statvfs(parent).f_flag & os.ST_RDONLY:
            why = "read-only file system"
        raise UserError(f"{what} {dest}: cannot be created in {parent} ({why}); choose a writable place")


def write_manifest(directory: Path) -> None:
    """Record every file under `directory` (but the manifest and the marker) with its size."""
    files = {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST, COMPLETE_MARKER)
    }
    write_json_atomic(directory / MANIFEST, files)


def check_manifest(directory: Path) -> str | None:
    """Why `directory` does not hold what its manifest lists, or None when it does."""
    try:
        files = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{MANIFEST} is missing"
    except (OSError, ValueError, UnicodeDecodeError):
        return f"{MANIFEST} is unreadable"
    if not isinstance(files, dict):
        return f"{MANIFEST} is unreadable"
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


def run_file(model_dir: Path, name: str) -> Path | None:
    """A file of the training run: beside the model (final/, a checkpoint) or in the run's output_dir above it."""
    for d in (model_dir, model_dir.parent):
        if (d / name).is_file():
            return d / name
    return None


def copy_run_files(src: Path, dst: Path) -> None:
    """Copy the run's files (`RUN_FILES`) of `src`, a model directory or a run's output_dir, into `dst`."""
    for name in RUN_FILES:
        f = run_file(src, name)
        if f is not None:
            shutil.copy2(f, dst / name)


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files (and chat template) that `src` holds into `dst`."""
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy2(src / f, dst / f)
