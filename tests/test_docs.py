"""The README and docs/ say what the code does: the generated references are current, the README is short,
starts with the commands that work on a fresh clone, and links only to pages that exist (or that the
pages of parallel work will add), and the Makefile passes a torch index through."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO

README = REPO / "README.md"
# Pages written in parallel work (model families, evaluation, first run on a GPU node); linked already.
PENDING = {"docs/architectures.md", "docs/eval.md", "docs/gpu.md"}


def test_generated_references_are_current() -> None:
    """docs/recipes.md's reference and docs/cli.md match the recipe dataclasses and the Click commands."""
    from sftdist import docgen

    stale = [str(p.relative_to(REPO)) for p in docgen.stale()]
    assert not stale, f"stale: {', '.join(stale)}; regenerate with: {docgen.COMMAND}"


def test_docgen_check_fails_on_a_stale_reference(tmp_path: Path, monkeypatch) -> None:
    """`python -m sftdist.docgen --check` exits 1 and names the command when a generated file is out of date,
    and 0 once regenerated (on copies, so the checkout is untouched)."""
    from sftdist import docgen

    for name in ("RECIPES_MD", "CLI_MD"):
        copy = tmp_path / getattr(docgen, name).name
        copy.write_text(getattr(docgen, name).read_text(encoding="utf-8"), encoding="utf-8")
        monkeypatch.setattr(docgen, name, copy)
    monkeypatch.setattr(docgen, "REPO", tmp_path)
    docgen.CLI_MD.write_text(docgen.CLI_MD.read_text().replace("--num-processes", "--gpus"), encoding="utf-8")
    assert docgen.main(["--check"]) == 1
    assert docgen.main([]) == 0 and docgen.main(["--check"]) == 0
    assert "| `global_batch_size` | integer or null | `null` |" in docgen.RECIPES_MD.read_text()
    assert "## `sftdist recipes copy`" in docgen.CLI_MD.read_text()


def test_docgen_command_line() -> None:
    out = subprocess.run([sys.executable, "-m", "sftdist.docgen", "--check"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_readme_short_starts_with_the_two_commands_and_links_resolve() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).splitlines()
    assert [line.split()[:2] for line in first_block] == [["make", "demo"], ["make", "test"]]
    assert "make test" in (REPO / ".ci" / "run").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    links = set(re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)(?:#[\w-]+)?\)", text))
    assert PENDING <= links
    missing = [link for link in links - PENDING if not (REPO / link).is_file()]
    assert not missing, missing
    for needed in ("install.md", "recipes.md", "cli.md", "data.md", "chat-templates.md", "cache.md", "distributed.md",
                   "slurm.md", "checkpoints.md", "merge-export.md", "sequence-parallel.md", "plan.md", "selftest.md",
                   "troubleshooting.md", "architecture.md"):
        assert f"docs/{needed}" in links, needed


def test_docs_links_between_pages_resolve() -> None:
    for page in (REPO / "docs").glob("*.md"):
        for link in re.findall(r"\]\(([\w./-]+\.md)(?:#[\w-]+)?\)", page.read_text(encoding="utf-8")):
            target = (page.parent / link).resolve()
            assert target.is_file() or f"docs/{link}" in PENDING, f"{page.name}: {link}"


def test_no_machine_specific_wording_or_deprecated_alias() -> None:
    """No 'this machine' claims, no paths of the machine that wrote them, and the checkpointing key by its
    current name (the alias is only mentioned as such)."""
    for path in [README, REPO / "CHANGELOG.md", *(REPO / "docs").glob("*.md")]:
        text = path.read_text(encoding="utf-8")
        assert "on this machine" not in text.lower().replace("\n", " "), path.name
        assert "/work/" not in text and "/root/" not in text, path.name
        assert "gradient_checkpointing: true" not in text, path.name
    for path in (REPO / "sftdist" / "recipes").glob("*.yaml"):
        assert "gradient_checkpointing" not in path.read_text(), path.name


def test_readme_figures_match_the_code() -> None:
    """The shutdown wait the README states is what sft.sbatch and the launcher set; the exit codes it lists
    are the ones the code uses."""
    from sftdist.errors import EXIT_PREEMPTED, EXIT_USER_ERROR
    from sftdist.launcher import DEFAULT_SHUTDOWN_TIMEOUT

    text = README.read_text(encoding="utf-8")
    sbatch = (REPO / "launch" / "slurm" / "sft.sbatch").read_text()
    wait = re.search(r"TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-(\d+)", sbatch).group(1)
    assert f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT={wait}" in text and f"waits {DEFAULT_SHUTDOWN_TIMEOUT} s" in text
    assert "--signal=USR1@300" in sbatch and "300 s before" in text
    for code in (0, 1, EXIT_USER_ERROR, EXIT_PREEMPTED, 130, 143):
        assert re.search(rf"\b{code}\b", text.split("Exit codes:", 1)[1].split("##", 1)[0]), code
    assert "96-99%" in text  # the demo's measured range (docs/install.md)


def test_makefile_passes_a_torch_index_only_when_given(tmp_path: Path) -> None:
    """`TORCH_INDEX` reaches pip as --index-url for the torch install; unset, the CPU default is unchanged."""
    def dry(*args: str) -> list[str]:
        out = subprocess.run(["make", "-n", "demo", f"VENV={tmp_path / 'venv'}", *args], cwd=REPO,
                             capture_output=True, text=True, check=True)
        return [line for line in out.stdout.splitlines() if "pip install" in line]

    cuda = dry("TORCH_INDEX=https://download.pytorch.org/whl/cu130")
    assert '"torch==2.13.0" --index-url "https://download.pytorch.org/whl/cu130"' in cuda[0]
    assert "--index-url" not in cuda[1]  # sftdist's own dependencies come from the usual index
    plain = dry()
    assert plain[0].split() == [f"{tmp_path / 'venv'}/bin/pip", "install", "-q", '"torch==2.13.0"']
    assert "TORCH_INDEX" in (REPO / "docs" / "install.md").read_text()
