"""A bad recipe through plain ``mergekit-yaml`` prints one line naming the problem and exits
non-zero (no traceback); ``MERGEKIT_SYMALIGN_DEBUG=1`` or ``-v`` brings the traceback back; other
exceptions keep theirs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from examples.common import mergekit_yaml_command, transfer_recipe, write_recipe
from mergekit_symalign import errors_cli
from mergekit_symalign.card import source_commit
from mergekit_symalign.errors import SymAlignConfigError


def _misspelt(family, tmp_path) -> str:
    recipe = transfer_recipe(family["reference_scrambled"], family["reference"], family["skill"], {})
    reference = next(m for m in recipe["models"] if m.get("parameters", {}).get("role"))
    reference["parameters"] = {"rol": "reference"}
    return write_recipe(recipe, tmp_path / "bad.yml")


def _merge(recipe, out, *args, **env):
    environ = {k: v for k, v in os.environ.items() if k != errors_cli.DEBUG_ENV}
    environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **env)
    return subprocess.run(mergekit_yaml_command() + [str(recipe), str(out), "--quiet", *args],
                          capture_output=True, text=True, env=environ, timeout=300)


def test_plugin_error_is_one_line_and_debug_brings_the_traceback_back(family, tmp_path):
    recipe = _misspelt(family, tmp_path)
    proc = _merge(recipe, tmp_path / "out")
    assert proc.returncode == 1  # the interpreter's status for an uncaught exception
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "rol" in line]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("Error: unknown parameter 'rol'") and "Did you mean 'role'?" in errors[0]
    assert f"{errors_cli.DEBUG_ENV}=1" in errors[0]
    assert not (tmp_path / "out").exists()

    for args, env in (((), {errors_cli.DEBUG_ENV: "1"}), (("-v",), {})):
        proc = _merge(recipe, tmp_path / "out", *args, **env)
        assert proc.returncode != 0
        assert "Traceback (most recent call last)" in proc.stderr
        assert "SymAlignConfigError: unknown parameter 'rol'" in proc.stderr


def test_other_errors_keep_their_traceback(family, tmp_path):
    # mergekit's own method and its own error (a model folder that does not exist)
    recipe = transfer_recipe(family["sibling"], family["reference"], tmp_path / "no-such-model")
    proc = _merge(write_recipe(recipe, tmp_path / "plain.yml"), tmp_path / "out")
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert not [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]


def test_hook_decides_by_program_and_settings():
    assert errors_cli.is_mergekit_command(["/venv/bin/mergekit-yaml", "r.yml", "out"])
    assert errors_cli.is_mergekit_command(["/venv/lib/site-packages/mergekit/scripts/run_yaml.py"])
    assert not errors_cli.is_mergekit_command(["my_script.py"])
    assert not errors_cli.is_mergekit_command([])
    assert errors_cli.debugging(["mergekit-yaml", "r.yml", "out", "-vv"], environ={})
    assert errors_cli.debugging(["mergekit-yaml"], environ={errors_cli.DEBUG_ENV: "1"})
    assert not errors_cli.debugging(["mergekit-yaml", "r.yml"], environ={errors_cli.DEBUG_ENV: "0"})
    line = errors_cli.one_line(SymAlignConfigError("two\nlines"))
    assert line.startswith("Error: two lines (") and "\n" not in line


def test_card_records_no_commit_outside_a_checkout(tmp_path):
    package = tmp_path / "site-packages" / "mergekit_symalign"
    package.mkdir(parents=True)
    assert source_commit(package) is None
    # a checkout of something else (a venv inside another project's repository): no commit
    (tmp_path / "site-packages" / "pyproject.toml").write_text('[project]\nname = "other"\n')
    subprocess.run(["git", "init", "-q", str(tmp_path / "site-packages")], check=True)
    assert source_commit(package) is None
    checkout = Path(__file__).resolve().parent.parent / "mergekit_symalign"
    commit = source_commit(checkout)
    if commit is None:
        pytest.skip("not run from a git checkout")
    assert len(commit.split()[0]) == 40


def test_report_help_lists_only_what_the_report_uses():
    from click.testing import CliRunner
    from mergekit.options import MergeOptions

    from mergekit_symalign.cli import MERGE_ONLY_OPTIONS, cli

    text = CliRunner().invoke(cli, ["report", "--help"]).output
    for name in MERGE_ONLY_OPTIONS:
        assert f"--{name.replace('_', '-')}" not in text, name
    for option in ("--cuda", "--device", "--read-to-gpu", "--lazy-unpickle", "--trust-remote-code",
                   "--allow-crimes", "--cache", "--tolerance", "-v"):
        assert option in text
    # every mergekit option is either listed or named merge-only: a new one needs a decision
    listed = {name for name in MergeOptions.model_fields
              if f"--{name.replace('_', '-')}" in text or name == "verbosity"}
    assert listed | set(MERGE_ONLY_OPTIONS) == set(MergeOptions.model_fields)
    assert not listed & set(MERGE_ONLY_OPTIONS)
