"""Models and data sets named by a hub id, on a machine where the hub may not be reachable.

Gap filled: when a file is not in its cache and the hub cannot be reached, huggingface_hub retries the
request five times with back-off: ten log lines over ~26 s before the error, in every command that
reads a model or a hub data set, unless the user has set `HF_HUB_OFFLINE=1`. Here the first read of a
hub id in a process asks the endpoint once (`PROBE_TIMEOUT_S` at most; a machine without network
fails at once); when that fails, the process, and every process it starts, goes on in offline mode:
the caches answer, or the command stops with one line.

The planner needs only a model's config.json; for the models the shipped recipes name, the published
file ships here (`configs/published/<org>/<name>/config.json`) and is used only when neither the hub nor
its cache has one: a real downloaded config.json always wins.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from sftdist.errors import UserError

PROBE_TIMEOUT_S = 5
SHIPPED_CONFIGS = Path(__file__).parent / "configs" / "published"


def looks_like_hub_id(text: str) -> bool:
    """`org/name`, not a path: no leading `.`, `/` or `~`, and no dot in the org (hub orgs have none)."""
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~")) and "." not in parts[0]


@functools.cache
def unreachable() -> str | None:
    """Why this process cannot use the hub (None: it can). Asks the endpoint at most once per process; on
    failure switches huggingface_hub, datasets and the processes started later to their caches alone."""
    from huggingface_hub import constants, get_session

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    except Exception as e:  # any failure to get a response (DNS, refused, timeout, proxy, TLS) means unreachable
        reason = f"{constants.ENDPOINT}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
    else:
        return None
    os.environ["HF_HUB_OFFLINE"] = "1"  # read at import by the libraries of this process and of those it starts
    constants.HF_HUB_OFFLINE = True  # read at every call by huggingface_hub, and so by transformers
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:  # datasets copies the setting at import
        datasets_config.HF_HUB_OFFLINE = True
    return reason


def offline_error(name: str, what: str) -> UserError | None:
    """The one line for hub id `name` whose `what` the libraries could not load while the hub cannot be
    used (None when it can: then the library's own reason, e.g. a gated model, is the better line)."""
    reason = unreachable() if looks_like_hub_id(name) else None
    if reason is None:
        return None
    from huggingface_hub import constants

    return UserError(
        f"{name}: not a local path, and {what} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) while "
        f"the hub cannot be used ({reason}); name a local directory, or fetch it once where the hub can be reached"
    )


def shipped_config(name: str) -> Path | None:
    """The directory of the published config.json shipped for hub id `name`, if sftdist ships one."""
    path = SHIPPED_CONFIGS / name / "config.json"
    return path.parent if looks_like_hub_id(name) and path.is_file() else None


# What a merge or an export reads of a base model: never pickles or other frameworks' weights.
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]


def model_dir(name: str) -> Path:
    """A local directory holding model `name`: the path itself, or, for a hub id, its snapshot in the Hugging
    Face cache, as `from_pretrained` (training, generate) resolves it: fetched when the hub can be reached,
    from the cache alone when it cannot, and one line when it is not there."""
    path = Path(name).expanduser()
    if path.exists() or not looks_like_hub_id(name):
        return path
    unreachable()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=MODEL_FILES))
    except Exception as e:  # not cached offline, gated, missing: huggingface_hub's errors have no common base
        raise offline_error(name, "the model") or UserError(
            f"{name}: not a local path, and the hub could not provide it ({str(e).strip().splitlines()[0]})"
        ) from None
