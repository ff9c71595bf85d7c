"""Keep the libraries' own chatter off the terminal, so that a user mistake is exactly one line.

Without this, every command also prints bitsandbytes' note about the missing `kernels` package,
DeepSpeed's "Setting accelerator to CPU", datasets' `Map` progress bars, transformers' weight-loading
bars and its "Token indices sequence length is longer than ..." warning (for rows that sftdist drops
and counts itself), and deprecation warnings aimed at library authors. None of it is actionable for a
user. `SFTDIST_VERBOSE=1` shows all of it. Only stdlib is imported here: it runs before the libraries
load (their settings are read at import), and settings made through the environment reach the
processes `sftdist launch` starts.
"""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE_ENV = "SFTDIST_VERBOSE"


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def silence_libraries() -> None:
    """Hide the libraries' warnings and progress bars (not the training progress bar or its logs)."""
    if verbose():
        return
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # datasets' Map/Filter bars
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bars
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    # Library loggers that warn about what is not the user's to fix. DeepSpeed resets its logger's level
    # at import but keeps filters; the others are module loggers whose level nothing resets.
    logging.getLogger("DeepSpeed").addFilter(_BelowError())
    for name in ("bitsandbytes", "transformers.tokenization_utils_base"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # torchrun's agent logs every failed worker with its own ERROR line; `sftdist launch` reports the exit
    # code itself, and a worker's user error is already its one `error:` line.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    # Its agent's module logger sets its own level when created (and warns "Received 15 death signal, shutting
    # down workers" when a launch is stopped, which `sftdist launch` reports itself): a filter stays.
    logging.getLogger("torch.distributed.elastic.agent.server.api").addFilter(_BelowError())
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")  # peft, on GPT-2's Conv1D
    # peft, saving a LoRA run whose embeddings sftdist grew for its pad token: saving them is what it should do.
    warnings.filterwarnings("ignore", message="Setting `save_embedding_layers` to `True`")
    # accelerate, when another job holds its default port: it picks a free one itself (a clash is an error later).
    warnings.filterwarnings("ignore", message="Port `.*` is already in use")
