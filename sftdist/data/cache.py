"""The prepared data on disk: one entry per fingerprint, built once, memory-mapped by every rank
(step 5 of read -> render -> encode -> pack -> cache).

Gap filled: trl prepares the data inside `SFTTrainer.__init__`, in every rank, on every start and
after every requeue, and keeps it in each rank's memory; ranks that wait on a collective meanwhile
time out. Here the entry is keyed by everything that changes the tokens (`fingerprint`), so the
same inputs give the same entry and any change gives a new one.

Who builds: local rank 0 of each node, under an exclusive lock (lock.py) on `<entry>.lock` in the
cache directory. On a node-local cache each node builds its own entry; on a shared file system the
first node to take the lock builds and the others find the entry complete when they get the lock.
The other ranks never build: they poll for the finished entry (files, not a collective, so no
timeout while a large mixture is tokenized) and then memory-map it.

An entry is built in a hidden sibling directory and made visible by one `rename` (rundir.py), so a
build killed midway leaves nothing that looks complete. Every read checks its manifest (file names
and sizes) and a CRC-32 of every file (`CHECKSUMS_FILE`: a file damaged at the same size would
otherwise train on wrong tokens, or fail as an Arrow traceback); an entry that fails either check is
rebuilt with a warning, never used. The checksums cost one read of the entry per rank and start (CRC-32
runs at about 3.5 GB/s from the page cache, which the trainer then reads from anyway).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click

from sftdist import lock, rundir
from sftdist.errors import UserError
from sftdist.recipe import Recipe

# Bump when the encoding, packing or report code changes what an entry holds.
ENCODING_VERSION = 4
INPUTS_FILE = "inputs.json"  # the fingerprint inputs, for a person wondering why an entry was built
CHECKSUMS_FILE = "checksums.json"  # {file: CRC-32} of every file of the entry
CACHE_ENV = "SFTDIST_CACHE"
# `data:` keys that change no token: they are left out of the fingerprint.
NOT_FINGERPRINTED = ("num_proc", "cache_dir")


@dataclass
class Entry:
    """A complete, verified cache entry and how this process came to have it."""

    path: Path
    how: str  # "built" | "hit" | "waited"


def cache_root(recipe: Recipe) -> Path:
    """`data.cache_dir`, else $SFTDIST_CACHE, else the user's cache directory."""
    if recipe.data.cache_dir:
        return Path(recipe.data.cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "sftdist" / "data"


def _blocks(path: Path) -> Iterator[memoryview]:
    """The file in blocks of 16 MiB, read into one buffer (each block is valid until the next)."""
    buf = bytearray(1 << 24)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            yield view[:n]


def _hash_file(h: Any, path: Path) -> None:
    for block in _blocks(path):
        h.update(block)


def _crc32(path: Path) -> int:
    crc = 0
    for block in _blocks(path):
        crc = zlib.crc32(block, crc)
    return crc


def _write_checksums(entry: Path) -> None:
    files = sorted(p for p in entry.rglob("*") if p.is_file())
    sums = {str(p.relative_to(entry)): _crc32(p) for p in files}
    (entry / CHECKSUMS_FILE).write_text(json.dumps(sums, indent=2), encoding="utf-8")


def _damage(entry: Path) -> str | None:
    """Why `entry` is not a complete, intact entry (missing or resized files, a checksum that does not
    match), or None when it is."""
    if not entry.is_dir():
        return "it is missing"
    why = rundir.check_manifest(entry)
    if why is not None:
        return why
    try:
        sums = json.loads((entry / CHECKSUMS_FILE).read_text(encoding="utf-8"))
        bad = next((name for name, crc in sums.items() if _crc32(entry / name) != crc), None)
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return f"{CHECKSUMS_FILE} is unreadable"
    return f"{bad} does not match its checksum" if bad else None


DIGESTS_DIR = "digests"  # under the cache root: {file identity on disk -> sha256 of its bytes}
# Digests hashed by this process, written under DIGESTS_DIR once its entry exists (`_remember_digests`),
# so that a command that fails writes nothing in the cache.
_hashed: dict[Path, str] = {}


def content_digest(path: Path, root: Path) -> str:
    """The sha256 of a file's bytes, hashed once and remembered under `root/digests` by where the bytes
    sit on disk: (device, inode, size, mtime, ctime). Any write changes the ctime, which no tool sets back,
    so an edit is hashed again even when its size and mtime are put back; a `touch`, a copy or a move is
    hashed again too and gives the same digest."""
    st = path.stat()
    where = json.dumps([str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    memo = root / DIGESTS_DIR / f"{hashlib.sha256(where.encode()).hexdigest()[:32]}.json"
    if memo in _hashed:
        return _hashed[memo]
    try:
        return json.loads(memo.read_text(encoding="utf-8"))["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    h = hashlib.sha256()
    _hash_file(h, path)
    _hashed[memo] = h.hexdigest()
    return h.hexdigest()


def _remember_digests() -> None:
    """Write the digests this process hashed; a cache that cannot take them only loses the memo."""
    for memo, sha in list(_hashed.items()):
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            rundir.write_text_atomic(memo, json.dumps({"sha256": sha}))
        except OSError:
            pass
        del _hashed[memo]


def _source_identity(path: str, root: Path) -> Any:
    """A local file or directory by its content (the size and sha256 of every file), so that a `touch`, a
    re-staged copy, a symlink or a move is the same data; anything else (a hub id) by name."""
    p = Path(path).expanduser()
    if p.is_file():
        return {"size": p.stat().st_size, "sha256": content_digest(p, root)}
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return {"files": [[str(f.relative_to(p)), f.stat().st_size, content_digest(f, root)] for f in files]}
    return {"hub": path}


def _tokenizer_identity(recipe: Recipe, load_tokenizer: Callable[[], Any]) -> str:
    """A hash of the tokenizer's files for a local model (no transformers import on a cache hit);
    for a hub id, of the loaded tokenizer's serialisation."""
    h = hashlib.sha256()
    model = Path(recipe.model.name_or_path).expanduser()
    if model.is_dir():
        for name in rundir.TOKENIZER_FILES:
            if (model / name).is_file():
                h.update(name.encode())
                _hash_file(h, model / name)
    else:
        tok = load_tokenizer()
        h.update(tok.backend_tokenizer.to_str().encode())
        h.update(str(tok.special_tokens_map).encode())
    ct = recipe.data.chat_template
    if ct and ct.endswith(".jinja") and Path(ct).is_file():
        _hash_file(h, Path(ct))
    return h.hexdigest()


def fingerprint_inputs(recipe: Recipe, load_tokenizer: Callable[[], Any]) -> dict[str, Any]:
    """Everything that changes the prepared tokens, as a JSON-able mapping."""
    from sftdist.model import PAD_TOKEN

    data = {k: v for k, v in recipe.to_dict()["data"].items() if k not in NOT_FINGERPRINTED}
    root = cache_root(recipe)
    for role in ("train", "eval"):
        for src in data[role]:
            src["identity"] = _source_identity(src["path"], root)
    return {
        "version": ENCODING_VERSION,
        "data": data,
        "shuffle_dataset": recipe.shuffle_dataset,
        "tokenizer": _tokenizer_identity(recipe, load_tokenizer),
        "pad_token": PAD_TOKEN,
    }


def digest(inputs: dict[str, Any]) -> str:
    """The entry's name: a hash of its fingerprint inputs."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:24]


def verify(entry: Path) -> bool:
    """True if `entry` holds every file its manifest lists, at the listed size and checksum."""
    return _damage(entry) is None


def _check_root(root: Path) -> None:
    """A cache location that is a file, or lies under one, is a mistake in a setting: one line."""
    for p in (root, *root.parents):
        if p.exists():
            if not p.is_dir():
                raise UserError(
                    f"{root}: the data cache location is not a directory ({p} is a file); "
                    f"set data.cache_dir or ${CACHE_ENV} to a directory"
                )
            return


# The errors that mean "this cache directory cannot take the entry" rather than a bug.
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT)


def _not_writable_errno(e: OSError) -> int | None:
    """e.errno, or the errno that pyarrow's write errors carry only in their text ("[errno 28] ...")."""
    m = re.search(r"\[errno (\d+)\]", str(e))
    code = e.errno or (int(m.group(1)) if m else None)
    return code if code in NOT_WRITABLE else None


def _user_error_if_unwritable(e: OSError, root: Path) -> Exception:
    """The one-line error for a cache directory that cannot take the entry; any other OSError as is."""
    code = _not_writable_errno(e)
    if code is None:
        return e
    return UserError(
        f"{root}: cannot write the data cache ({os.strerror(code)}); set data.cache_dir or ${CACHE_ENV} to a "
        "writable directory with free space, or run `sftdist prepare` where it is writable"
    )


def ensure_entry(
    recipe: Recipe, load_tokenizer: Callable[[], Any], build: Callable[[Path], None], force: bool = False,
    inputs: dict[str, Any] | None = None,
) -> Entry:
    """The verified entry for `recipe`'s data: found, built here (local rank 0), or waited for. `inputs`:
    the fingerprint inputs when the caller has them already (hashing the tokenizer files again costs)."""
    root = cache_root(recipe)
    _check_root(root)
    if inputs is None:
        inputs = fingerprint_inputs(recipe, load_tokenizer)
    fp = digest(inputs)
    entry = root / fp
    if not force and verify(entry):
        _remember_digests()
        return Entry(entry, "hit")
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return Entry(_wait_for(entry), "waited")
    failure = root / f"{fp}.error"  # what the last build of this entry failed with, for the ranks waiting on it
    try:
        root.mkdir(parents=True, exist_ok=True)
        with lock.exclusive(root / f"{fp}.lock"):
            why = _damage(entry) if not force else None
            if why is None and not force:
                _remember_digests()
                return Entry(entry, "hit")  # another node built it while we waited for the lock
            if entry.exists() and not force:
                click.echo(f"warning: data cache entry {entry} is incomplete or corrupt ({why}); rebuilding it", err=True)
            failure.unlink(missing_ok=True)
            rundir.remove_stale_partials(root)  # builds killed midway, of this entry or of any other
            try:
                with rundir.build_beside(entry, replace=True) as tmp:
                    build(tmp)
                    (tmp / INPUTS_FILE).write_text(json.dumps(inputs, indent=2, default=str), encoding="utf-8")
                    _write_checksums(tmp)
                    rundir.write_manifest(tmp)
            except UserError as e:
                rundir.write_text_atomic(failure, str(e))
                raise
    except OSError as e:
        raise _user_error_if_unwritable(e, root) from None
    _remember_digests()
    return Entry(entry, "built")


def _wait_for(entry: Path) -> Path:
    """Poll for the entry that local rank 0 builds, saying what this rank waits for; stop waiting when that
    build fails (with its error, which the builder prints) or when this process is asked to stop."""
    import psutil

    from sftdist import preemption

    rank = os.environ.get("RANK", "?")
    failure = entry.parent / f"{entry.name}.error"
    born = psutil.Process().create_time()  # an older failure file belongs to an earlier launch
    click.echo(f"sftdist: rank {rank} waiting for the data cache {entry} (local rank 0 builds it)")
    start = last = time.monotonic()
    while not verify(entry):
        if failure.is_file() and failure.stat().st_mtime >= born:
            raise UserError(failure.read_text(encoding="utf-8"), shown_elsewhere=True)
        preemption.stop_if_requested("while waiting for the data cache")
        time.sleep(0.5)
        if time.monotonic() - last > 60:
            last = time.monotonic()
            click.echo(f"sftdist: rank {rank} still waiting for {entry} ({time.monotonic() - start:.0f} s)")
    return entry
