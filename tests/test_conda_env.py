"""The conda environment of the rules (`snakemake --software-deployment-method conda`): pinned to the lock, and
installing this project in a way that survives Snakemake's copy of the environment file.

Snakemake (9) writes the environment file to `.snakemake/conda/HASH.yaml`, runs `conda env create --file
HASH.yaml --prefix HASH` (conda runs the `pip:` entries from the file's folder), copies the post-deploy
script beside it as `HASH.post-deploy.sh` and runs it with the environment activated, from the working
directory. Conda itself cannot run here (offline, no conda): a Python virtual environment stands in for the
created environment, with the packages of the test environment; the copy, the post-deploy script and the
install it makes are real."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENV_FILE = ROOT / "envs" / "smat.yaml"
POST_DEPLOY = ROOT / "envs" / "smat.post-deploy.sh"
LOCK = ROOT / "requirements-lock.txt"
PIN = re.compile(r"^[A-Za-z0-9._-]+==[A-Za-z0-9.+!_-]+$")


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            assert PIN.match(line), f"requirements-lock.txt: {line!r} is not an exact pin"
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def env_pip_entries() -> list[str]:
    env = yaml.safe_load(ENV_FILE.read_text())
    return next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))


def test_environment_pins_the_versions_of_the_lock():
    env = yaml.safe_load(ENV_FILE.read_text())
    assert env["channels"][0] == "conda-forge"
    assert "python=3.11" in env["dependencies"]
    entries = env_pip_entries()
    # Only exact pins: no path or option, which would be read relative to Snakemake's copy of the file.
    assert all(PIN.match(entry) for entry in entries), [e for e in entries if not PIN.match(e)]
    pinned = {name.lower().replace("_", "-"): version for name, version in (e.split("==") for e in entries)}
    lock = lock_pins()
    assert pinned == lock, ("envs/smat.yaml and requirements-lock.txt differ: "
                            f"{sorted(set(pinned.items()) ^ set(lock.items()))}")
    for package in ("torch", "timm", "snakemake", "safetensors", "docutils"):
        assert package in lock


def test_every_declared_dependency_is_locked():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["test"]
    names = {re.split(r"[<>=!~ \[;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}
    assert names <= set(lock_pins()), names - set(lock_pins())


def test_every_package_the_code_imports_is_declared():
    """Third-party imports of the package against pyproject's dependencies."""
    import ast
    import importlib.metadata
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~ \[;]", r, maxsplit=1)[0].lower().replace("_", "-")
                for r in project["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    missing = set()
    for path in (ROOT / "smat").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for module in modules:
                top = module.split(".")[0]
                if top == "smat" or top in sys.stdlib_module_names:
                    continue
                names = {d.lower().replace("_", "-") for d in distributions.get(top, [top])}
                if not names & declared:
                    missing.add(f"{top} ({path.relative_to(ROOT)})")
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"


def snakemake_copies(workdir: Path) -> tuple[Path, Path]:
    """The environment file and post-deploy script where Snakemake puts them (deployment/conda.py)."""
    conda_dir = workdir / ".snakemake" / "conda"
    conda_dir.mkdir(parents=True)
    env_path = conda_dir / "0123abcd"
    shutil.copyfile(ENV_FILE, f"{env_path}.yaml")
    shutil.copyfile(POST_DEPLOY, f"{env_path}.post-deploy.sh")
    return env_path, Path(f"{env_path}.post-deploy.sh")


def stand_in_environment(prefix: Path) -> Path:
    """A Python environment at `prefix` with the test environment's packages (which conda would install)."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(prefix)],
                   check=True, timeout=300)
    return prefix / "bin"


def run_post_deploy(script: Path, bin_dir: Path, cwd: Path, workflow_dir: Path | None):
    """As Snakemake runs it: `source activate ENV; bash SCRIPT` (here: the environment's bin first on PATH)."""
    env = {k: v for k, v in os.environ.items() if k not in ("SMAT_WORKFLOW_DIR", "PYTHONPATH")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", VIRTUAL_ENV=str(bin_dir.parent))
    if workflow_dir is not None:
        env["SMAT_WORKFLOW_DIR"] = str(workflow_dir)
    return subprocess.run(["bash", str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_post_deploy_installs_this_checkout_into_the_environment_snakemake_created(tmp_path):
    workdir = tmp_path / "work"                      # a run elsewhere (snakemake --directory)
    env_path, script = snakemake_copies(workdir)
    bin_dir = stand_in_environment(env_path)
    python = bin_dir / "python"
    pip_version = subprocess.run([python, "-m", "pip", "--version"], capture_output=True, text=True)
    assert pip_version.returncode == 0, "the stand-in environment has no pip"

    lost = run_post_deploy(script, bin_dir, cwd=workdir, workflow_dir=None)
    assert lost.returncode == 1 and "set SMAT_WORKFLOW_DIR" in lost.stderr

    done = run_post_deploy(script, bin_dir, cwd=workdir, workflow_dir=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    where = subprocess.run([python, "-c", "import smat; print(smat.__file__)"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()) == ROOT / "smat" / "__init__.py"
    version = subprocess.run([bin_dir / "smat", "--version"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("smat "), version.stderr


def test_the_cpu_install_of_readme_and_ci_names_the_locked_torch():
    """README's Quick start and .ci/run install the CPU build of the lock's torch and torchvision, then the lock."""
    lock = lock_pins()
    wanted = f"torch=={lock['torch']}+cpu torchvision=={lock['torchvision']}+cpu"
    for path in (ROOT / "README.md", ROOT / ".ci" / "run"):
        text = path.read_text()
        assert re.search(r"pip install (--quiet )?" + re.escape(wanted), text), path
        assert "--index-url https://download.pytorch.org/whl/cpu" in text, path
        assert re.search(r'pip install (--quiet )?-c requirements-lock.txt -e "\.\[test\]"', text), path
