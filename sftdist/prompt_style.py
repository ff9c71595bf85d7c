"""How a trained model's prompts are rendered: as a user turn of its chat template, or through a
named prompt template. Decided once, when training starts, and carried as `sftdist_prompt.json`.

Why a file of its own: which rendering a run trained on depends on the formats detected in its data
files, which another machine (or the same one, later) may no longer have. The run records the
decision in its output_dir; `rundir.copy_run_files` carries it, with the recipe, into every
checkpoint, `final/`, export and merged model, and `sftdist generate` reads it from whichever of
them it is given, without the data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sftdist import rundir
from sftdist.errors import UserError
from sftdist.recipe import Recipe
from sftdist.rundir import PROMPT_FILE

if TYPE_CHECKING:
    from sftdist.data.pipeline import DataReport


@dataclass(frozen=True)
class PromptStyle:
    chat: bool  # a user turn of the tokenizer's chat template (the run trained on chat sources only)
    template: str  # the prompt template of instruction rows (data.template)
    source: str  # where it comes from, for the line `generate` prints

    def describe(self) -> str:
        how = "as a user turn of the chat template" if self.chat else f"through the prompt template '{self.template}'"
        return f"prompts rendered {how} ({self.source})"


def record(recipe: Recipe, report: DataReport) -> None:
    """Write the run's prompt style into output_dir, from where every checkpoint and the final model copy
    it: chat when every training source's rows are chat (the layouts the data pipeline detected, as
    training rendered them); a mixed run keeps the prompt template."""
    from sftdist.data.formats import CHAT_FORMATS

    layouts = [s.layout for s in report.sources if s.role == "train"]
    chat = bool(layouts) and all(layout in CHAT_FORMATS for layout in layouts)
    rundir.write_json_atomic(Path(recipe.output_dir) / PROMPT_FILE, {"chat": chat, "template": recipe.data.template})


def read(model_dir: Path) -> PromptStyle:
    """The prompt style saved with a model (or in the run directory above it); a model that sftdist
    did not train, or trained before the file existed, gets the default prompt template."""
    from sftdist.data.templates import PROMPT_TEMPLATES

    path = rundir.run_file(model_dir, PROMPT_FILE)
    if path is None:
        return PromptStyle(False, "default", f"no {PROMPT_FILE} beside the model")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path}: is not valid JSON") from None
    if not (isinstance(raw, dict) and isinstance(raw.get("chat"), bool) and raw.get("template") in PROMPT_TEMPLATES):
        raise UserError(
            f"{path}: expected {{\"chat\": true|false, \"template\": one of {', '.join(PROMPT_TEMPLATES)}}}"
        )
    return PromptStyle(raw["chat"], raw["template"], str(path))
