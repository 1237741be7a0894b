"""The release: wheel and sdist build offline, their metadata passes ``twine check``, one version
is shared by the metadata, ``__version__`` and the model card, and the wheel installed into a
fresh virtual environment makes plain ``mergekit-yaml`` merge an aligned recipe with no import
by the user (the wheel's ``.pth`` hook registers the methods)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from examples.common import load_tensors, transfer_recipe, write_recipe

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("build", reason="pip install -e '.[test]' (scripts/setup.sh) installs build")
pytest.importorskip("twine", reason="pip install -e '.[test]' (scripts/setup.sh) installs twine")
pytest.importorskip("hatchling", reason="pip install -e '.[test]' installs hatchling")


def _run(cmd, **kwargs):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300,
                          **kwargs)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """The wheel and sdist, built from this checkout without network (no isolated env)."""
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--wheel", "--sdist",
          "--outdir", out, ROOT])
    wheel, = out.glob("*.whl")
    sdist, = out.glob("*.tar.gz")
    return wheel, sdist


def test_metadata_is_complete_and_passes_twine_check(dist):
    from mergekit_symalign import __version__

    wheel, sdist = dist
    _run([sys.executable, "-m", "twine", "check", "--strict", wheel, sdist])
    assert wheel.name == f"mergekit_symalign-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = Parser().parsestr(z.read(f"mergekit_symalign-{__version__}.dist-info/METADATA")
                                 .decode())
    assert meta["Version"] == __version__
    assert meta["License-Expression"] == "LGPL-3.0-only"
    assert meta["Author"] and meta["Keywords"] and meta.get_all("Classifier")
    assert meta.get_all("Project-URL") and meta["Description-Content-Type"] == "text/markdown"
    assert "mergekit==0.1.5" in meta.get_all("Requires-Dist")
    assert any(n.endswith("licenses/LICENSE") for n in names)
    # the autoload hook and the package; no tests, examples or benchmarks
    assert {"mergekit_symalign.pth", "_mergekit_symalign_autoload.py",
            "mergekit_symalign/__init__.py", "mergekit_symalign/data/calibration.jsonl"} <= set(names)
    assert not [n for n in names if n.startswith(("tests/", "examples/", "benchmarks/"))]
    with tarfile.open(sdist) as t:
        members = {Path(m).relative_to(Path(m).parts[0]).as_posix() for m in t.getnames()
                   if len(Path(m).parts) > 1}
    assert {"pyproject.toml", "README.md", "CHANGELOG.md", "LICENSE",
            "mergekit_symalign/__init__.py", "mergekit_symalign.pth"} <= members


def test_changelog_names_the_current_version():
    from mergekit_symalign import __version__

    text = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {__version__}" in text


def _fresh_venv(root: Path, wheel: Path) -> Path:
    """A new venv with only the wheel installed in it (offline, no dependencies); the
    dependencies (mergekit, torch, ...) come from this interpreter's site-packages, appended
    to the new venv's path by a .pth line (so the wheel's own files come first, and this
    checkout's editable install, a .pth inside that folder, is not processed)."""
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                .stdout.strip())
    (site / "zz_project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-index", "--no-deps",
          "--disable-pip-version-check", "--quiet", wheel])
    # the console script mergekit's wheel would have installed, for this interpreter
    script = venv / "bin" / "mergekit-yaml"
    script.write_text(f"#!{python}\nimport sys\nfrom mergekit.scripts.run_yaml import main\n"
                      f"sys.exit(main())\n")
    script.chmod(0o755)
    return venv


def test_wheel_in_a_fresh_venv_merges_through_plain_mergekit_yaml(dist, family, tmp_path):
    from mergekit_symalign import __version__

    wheel, _ = dist
    venv = _fresh_venv(tmp_path, wheel)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONNOUSERSITE="1")
    where = _run([venv / "bin" / "python", "-c", "import mergekit_symalign, sys; "
                  "print(mergekit_symalign.__file__); print(mergekit_symalign.__version__)"],
                 env=env, cwd=tmp_path).stdout.split()
    assert where[0].startswith(str(venv)) and where[1] == __version__  # the wheel, not the checkout
    recipe = write_recipe(transfer_recipe(family["reference_scrambled"], family["reference"],
                                          family["skill"], {}), tmp_path / "recipe.yml")
    out = tmp_path / "merged"
    _run([venv / "bin" / "mergekit-yaml", recipe, out, "--quiet"], env=env, cwd=tmp_path)
    card = (out / "README.md").read_text()
    assert "## Symmetry alignment (mergekit-symalign)" in card
    assert f"mergekit-symalign {__version__}" in card
    assert "commit" not in card.split("## Symmetry alignment")[1].split("###")[0]  # no checkout
    assert load_tensors(out)  # it merged
