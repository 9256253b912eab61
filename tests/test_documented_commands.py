"""Every `snakemake` command the documentation shows runs as written, from the project root.

The commands are collected from README.md, config/README.md, workflow/profiles/README.md and the comments of
the config files: lines of shell code blocks, inline code spans and commented command lines. Each is run as
a dry run (`-n` appended: the real runs take hours or need a cluster, data or the internet); a command that
fails there fails this test. The `smat` usage lines are synopses with placeholders (SRC, STORE, ...), which
the command-line tests exercise; the few other exceptions are listed with the reason.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", ROOT / "config" / "README.md", ROOT / "workflow" / "profiles" / "README.md",
             *sorted((ROOT / "config").glob("*.yaml")), *sorted((ROOT / "config").glob("*/*.yaml"))]
# Not dry-runnable as written, and why.
NOT_DRY_RUNNABLE = {
    "snakemake --report report.html": "reports on the finished results of `all` (figures included), hours of work",
    "snakemake --report report.html all_tables": "reports on finished results (tests/test_workflow.py builds it "
                                                 "for the CI run)",
    "snakemake --unlock": "acts on a killed run (tests/test_workflow.py runs it after kill -9)",
}

pytestmark = pytest.mark.slow


def documented_commands() -> dict[str, list[str]]:
    """{command: documents showing it} for every snakemake command line shown in the documents."""
    found = []
    for path in DOCUMENTS:
        text = path.read_text()
        if path.suffix == ".yaml":                               # commands are in the comments
            text = "\n".join(re.sub(r"^\s*#\s?", "", line) for line in text.splitlines())
        lines = re.sub(r"\\\n\s*", " ", text).splitlines()    # join continued lines
        candidates = lines + re.findall(r"`(snakemake [^`]+)`", text)
        for line in candidates:
            command = re.sub(r"\s+#.*$", "", line).strip()
            placeholder = re.search(r"(?<![-\w])[A-Z]{2,}(?![\w])", command)    # N, TARGET, FILE, ...
            if command.startswith("snakemake ") and "..." not in command and not placeholder:
                found.append((" ".join(command.split()), str(path.relative_to(ROOT))))
    commands: dict[str, list[str]] = {}
    for command, document in sorted(set(found)):
        commands.setdefault(command, []).append(document)
    return commands


COMMANDS = documented_commands()


def test_the_documents_show_the_main_commands():
    commands = set(COMMANDS)
    for expected in ("snakemake --cores 8 all_tables", "snakemake fetch_backbone --configfile config/paper.yaml",
                     "snakemake all --profile workflow/profiles/slurm --profile workflow/profiles/paper "
                     "--configfile config/paper.yaml"):
        assert expected in commands


@pytest.mark.parametrize("command", list(COMMANDS))
def test_documented_command_dry_runs_from_the_project_root(command):
    if command in NOT_DRY_RUNNABLE:
        pytest.skip(NOT_DRY_RUNNABLE[command])
    args = shlex.split(command)
    assert args[0] == "snakemake"
    result = subprocess.run([sys.executable, "-m", "snakemake", *args[1:], "-n"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"{', '.join(COMMANDS[command])}: `{command}` failed:\n{result.stderr[-3000:]}"
