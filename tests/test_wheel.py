"""The wheel is the product: container recipes and air-gapped hosts install it, with no checkout beside it.

The wheel is built from a copy of the checkout (so no stale `build/` can lend it files) and installed into a fresh
virtual environment outside the checkout. That environment sees the pinned dependencies through a `.pth` path line
naming this interpreter's site-packages; a path line does not run the `.pth` files inside that directory, so the
editable install of the checkout stays invisible. Commands then run from a directory outside the checkout, with no
PYTHONPATH, so every module and every data file they touch must come from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import POLICIES, REPO

from classification.policy import load_policy

# Top-level entries of a checkout that are not source: environments, caches, build outputs.
NOT_SOURCE = {".git", ".venv", ".cache", "build", "dist", ".pytest_cache", ".ruff_cache", ".hypothesis", "tests"}
PROBE = """
import json, sysconfig
import engine, classification, policies
from appliance.quickstart import examples
from classification.library import library_dir
from engine.checkpoint.smoke import cache, data, evaluation
print(json.dumps({"site": sysconfig.get_paths()["purelib"], "engine": engine.__file__,
                  "classification": classification.__file__, "library": str(library_dir()),
                  "smoke_policy": str(data.POLICY_FILE), "smoke_golden": len(evaluation.golden_items()),
                  "smoke_key": cache.cache_key(0, None), "quickstart_examples": len(examples())}))
"""


@dataclass(frozen=True)
class Install:
    wheel: Path
    venv: Path
    env: dict[str, str]
    cwd: Path

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(args, cwd=self.cwd, env={**self.env, **(env or {})}, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, f"{args[0]} {args[1]}: exit {result.returncode}\n{result.stdout}{result.stderr}"
        return result

    def appliance(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return self.run(str(self.venv / "bin" / "appliance"), *args, env=env)


def _ignore_non_source(directory: str, names: list[str]) -> set[str]:
    top = Path(directory) == REPO
    return {n for n in names if n == "__pycache__" or n.endswith(".egg-info") or (top and n in NOT_SOURCE)}


def _build_wheel(work: Path) -> Path:
    source, dist = work / "src", work / "dist"
    shutil.copytree(REPO, source, ignore=_ignore_non_source)
    # No build isolation: the build must work offline, with the setuptools this environment already has.
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "--no-index", "--no-cache-dir", "--quiet", "-w", str(dist)], check=True, timeout=300)
    (wheel,) = dist.glob("safeguard_appliance-*.whl")
    return wheel


def _isolated_env(venv: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not k.startswith("APPLIANCE_")}
    env |= {"PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", "HOME": str(home),
            "APPLIANCE_CACHE_DIR": os.environ["APPLIANCE_CACHE_DIR"]}  # the offline vocabulary, built once
    return env


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory) -> Install:
    work = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(work)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # Installed before the dependencies are made visible, so pip never sees (or touches) the editable install.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--quiet", str(wheel)], check=True, timeout=300)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (Path(site) / "dependencies.pth").write_text("".join(f"{path}\n" for path in ours))
    (work / "home").mkdir()
    (work / "cwd").mkdir()
    return Install(wheel, venv, _isolated_env(venv, work / "home"), work / "cwd")


def _package_data(root: Path) -> set[str]:
    """Every file of every package directory in the checkout: what the code may read at run time."""
    packages = [p for p in root.iterdir() if (p / "__init__.py").is_file() and p.name not in NOT_SOURCE]
    return {f.relative_to(root).as_posix() for package in packages for f in package.rglob("*")
            if f.is_file() and (f.parent / "__init__.py").is_file() and "__pycache__" not in f.parts
            and f.suffix != ".pyc"}


def test_the_wheel_carries_every_file_of_every_package(install: Install):
    with zipfile.ZipFile(install.wheel) as wheel:
        names = set(wheel.namelist())
    missing = sorted(_package_data(REPO) - names)
    assert not missing, f"not in the wheel: {missing}"
    assert {"policies/smoke.md", "policies/smoke.golden.jsonl", "engine/checkpoint/presets/gpt-oss-20b.json",
            "server/generated/safeguard/v1/safeguard_pb2.pyi"} <= names


@pytest.fixture(scope="module")
def probe(install: Install) -> dict:
    """Where the installed modules and the bundled data are, as the installed code itself finds them."""
    return json.loads(install.run(str(install.venv / "bin" / "python"), "-c", PROBE).stdout)


def test_code_and_data_come_from_the_installed_wheel(install: Install, probe: dict):
    site = Path(probe["site"])
    assert site.is_relative_to(install.venv)
    for name in ("engine", "classification", "library", "smoke_policy"):
        assert Path(probe[name]).is_relative_to(site), (name, probe[name])
    assert probe["smoke_golden"] > 0
    assert probe["quickstart_examples"] >= 3


def test_synth_smoke_runs_from_the_wheel(install: Install):
    out = install.cwd / "smoke"
    # Untrained: training costs minutes without a warm cache; the smoke policy and golden set are probed above.
    install.appliance("synth", "--preset", "smoke", "--no-train", "--out", str(out))
    report = install.appliance("inspect", str(out)).stdout
    assert report.rstrip().endswith("OK"), report


def test_the_bundled_library_imports_from_the_wheel(install: Install):
    state = {"APPLIANCE_STATE_DIR": str(install.cwd / "state")}
    imported = install.appliance("policy", "import", env=state).stdout  # no directory: the bundled library
    listed = install.appliance("policy", "list", env=state).stdout
    expected = {load_policy(p).id for p in POLICIES.glob("*.md") if p.name != "README.md"}
    assert {line.split()[0] for line in listed.splitlines()[1:]} == expected, imported
    assert not (install.cwd / "home" / ".local").exists()
