"""The model card of an aligned merge says it was made with mergekit-symalign, and what it did.

mergekit's ``run_merge`` writes ``README.md`` with ``generate_card(config=..., config_yaml=...,
name=...)``, a name it imported into ``mergekit.merge`` from ``mergekit.card``. :func:`hook_card`
(called by :func:`.plugin.install`) wraps that function in both modules, in place, once: for a
``symmetry_aligned_*`` recipe the wrapper appends :func:`card_section` (version, the commit it
ran from, the install lines that make the recipe reproducible, what the method does, and the
alignment summary that the merge's alignment tasks recorded in its collector, :mod:`.collect`);
every other card is mergekit's, unchanged. ``mergekit_config.yml`` is not touched: it stays the exact recipe.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence

import yaml

from .compat import TARGET_VERSION
from .methods import PAPER_URL, PREFIX
from .report import fmt, versions

PYPI_NAME = "mergekit-symalign"
TAG = "mergekit-symalign"
MAX_LAYER_ROWS = 48  # per-layer table rows in the card (the report has them all)


def summary_markdown(report: Mapping[str, Any]) -> str:
    """The alignment summary: one row per aligned model, per-layer distances folded away."""
    pairs = report["pairs"]
    if not pairs:
        return ("No model was aligned (`align: false` on every model): the merge is plain "
                f"`{report['wrapped']}`.")
    lines = ["| model | aligned to | identity | layers moved | distance to the reference "
             "before → after (median over layers) |", "|---|---|---|---|---|"]
    for p in pairs:
        lines.append(f"| {p['model']} | {p['reference']} | {'yes' if p['identity'] else 'no'} "
                     f"| {p['layers_moved']} / {p['layers_total']} "
                     f"| {fmt(p['distance_before_median'])} → {fmt(p['distance_after_median'])} |")
    lines += ["", *report["verdict"][-1:], ""]
    lines += [f"<details><summary>Per-layer distances (tolerance of the identity test: "
              f"{report['tolerance']:g})</summary>", "",
              "| model | layer | before | after | moved |", "|---|---:|---:|---:|---|"]
    rows = [(p, r) for p in pairs for r in p["layers"]]
    for p, r in rows[:MAX_LAYER_ROWS]:
        lines.append(f"| {p['model']} | {r['layer']} | {fmt(r['distance_before'])} "
                     f"| {fmt(r['distance_after'])} | {'no' if r['identity'] else 'yes'} |")
    if len(rows) > MAX_LAYER_ROWS:
        lines.append(f"| … {len(rows) - MAX_LAYER_ROWS} more rows: `mergekit-symalign report "
                     f"mergekit_config.yml OUT` lists them all | | | | |")
    lines += ["", "</details>"]
    return "\n".join(lines)


def source_commit(package_dir: Optional[Path] = None) -> Optional[str]:
    """The git commit the plugin runs from, ``(plus uncommitted changes)`` when its tree is dirty;
    None when it is not run from a git checkout of mergekit-symalign (an installed wheel)."""
    root = Path(package_dir or Path(__file__).resolve().parent).parent
    pyproject = root / "pyproject.toml"
    try:  # a checkout of this project, not a wheel inside some other repository
        if f'name = "{PYPI_NAME}"' not in pyproject.read_text(encoding="utf-8"):
            return None
        run = dict(cwd=root, capture_output=True, text=True, timeout=10, check=True)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               **run).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit} (plus uncommitted changes)" if dirty else commit


def install_lines(version: str, mergekit: str, commit: Optional[str]) -> List[str]:
    """The card's reproduce block: the source install that works today, the PyPI line for
    once the package is released there, and the merge command."""
    at = f" at commit {commit}" if commit else ""
    return [
        f"# mergekit-symalign {version} is not on PyPI yet: install it from a checkout of its",
        f"# source{at}, or from a wheel built from one (`python -m build`):",
        f'pip install "mergekit=={mergekit}" ./mergekit-symalign    # or ./{_wheel(version)}',
        "# Once it is released on PyPI:",
        f'# pip install "mergekit=={mergekit}" "{PYPI_NAME}=={version}"',
        "mergekit-yaml mergekit_config.yml ./merged",
    ]


def _wheel(version: str) -> str:
    return f"{PYPI_NAME.replace('-', '_')}-{version}-py3-none-any.whl"


def card_section(method: str, report: Optional[Mapping[str, Any]],
                 commit: Optional[str] = None) -> str:
    """The card's mergekit-symalign section; ``report`` as :func:`.report.build_report` builds
    it from the merge's collected records (None: nothing was recorded); ``commit`` as
    :func:`source_commit` finds it (None: not run from a checkout)."""
    installed = versions()
    version = installed["mergekit-symalign"]
    wrapped = method[len(PREFIX):]
    made_from = f" (commit `{commit}`)" if commit else ""
    lines = [
        "## Symmetry alignment (mergekit-symalign)",
        "",
        f"Made with mergekit-symalign {version}{made_from}, a mergekit plugin: "
        f"`{method}` is mergekit's `{wrapped}` run after aligning the models along the exact "
        f"symmetries of the transformer (MLP neuron permutations and scales, a rotation and "
        f"scale per GQA group on values/outputs, a rotation and scale per RoPE plane on "
        f"queries/keys; [arXiv 2511.10850]({PAPER_URL})). An aligned model computes the same "
        f"function as before; only its coordinates change, so that skill vectors "
        f"(`skill − reference`) are added to the weights that play the same role.",
        "",
        "To reproduce this model from the configuration above (`mergekit_config.yml`):",
        "",
        "```sh",
        *install_lines(version, installed.get("mergekit", TARGET_VERSION), commit),
        "```",
        "",
        "### What alignment did",
        "",
    ]
    if report is None:
        lines.append("Not recorded for this merge; `mergekit-symalign report mergekit_config.yml "
                     "OUT` shows it.")
    else:
        lines.append(summary_markdown(report))
    return "\n".join(lines) + "\n"


def _tagged(card: str) -> str:
    """Add the plugin's tag to the card's YAML front matter (left as is if unreadable)."""
    if not card.startswith("---\n"):
        return card
    end = card.find("\n---\n", 4)
    if end < 0:
        return card
    try:
        meta = yaml.safe_load(card[4:end]) or {}
    except yaml.YAMLError:
        return card
    if not isinstance(meta, dict):
        return card
    tags = list(meta.get("tags") or [])
    if TAG not in tags:
        meta["tags"] = tags + [TAG]
    return "---\n" + yaml.dump(meta) + card[end + 1:]


def _aligned_method(config):
    """The recipe's method if it is one of ours, else None."""
    from .methods import SymmetryAlignedMerge

    registry = importlib.import_module("mergekit.merge_methods.registry")
    try:
        method = registry.get(str(config.merge_method))
    except Exception:  # not registered: mergekit's own card says so
        return None
    return method if isinstance(method, SymmetryAlignedMerge) else None


def _recorded(config, method) -> Optional[Mapping[str, Any]]:
    """The summary of what this merge's alignment tasks recorded (its collector, released)."""
    from . import collect
    from .report import build_report
    from .settings import recipe_setting

    collector = collect.find(config)
    if collector is None:
        return None
    collect.release(collector.key)
    alignment = recipe_setting(config.parameters, "alignment")
    return build_report(collector.records, method=method.spec.name, wrapped=method.wrapped,
                        alignment=alignment, tol=collector.tolerance, versions=versions())


def aligned_card(card: str, config) -> str:
    """``card`` (mergekit's) with the plugin's tag and section, for an aligned recipe."""
    method = _aligned_method(config)
    if method is None:
        return card
    from .crosssize_planning import card_section as pruned_child_section

    recorded = _recorded(config, method)
    child = pruned_child_section(config)
    # a pruned child's merge records no same-size alignment: its section says what was done
    section = card_section(method.spec.name, None if child else recorded, source_commit())
    if child:
        section = section.replace("Not recorded for this merge; `mergekit-symalign report "
                                  "mergekit_config.yml OUT` shows it.", child.rstrip("\n"))
    return _tagged(card).rstrip("\n") + "\n\n" + section


def _wrap(original):
    def generate_card(config, config_yaml: str, name: Optional[str] = None) -> str:
        return aligned_card(original(config=config, config_yaml=config_yaml, name=name), config)

    generate_card.__wrapped__ = original
    generate_card.__doc__ = original.__doc__
    generate_card._symalign = True
    return generate_card


def hook_card(modules: Sequence[str] = ("mergekit.card", "mergekit.merge")) -> None:
    """Idempotent: wrap ``generate_card`` where mergekit defines it and where ``run_merge``
    looks it up. ``mergekit.merge`` may be half-imported (the plugin installs from inside its
    import) or not imported yet; it then binds the wrapped function from ``mergekit.card``."""
    card = importlib.import_module("mergekit.card")
    original = getattr(card.generate_card, "__wrapped__", card.generate_card)
    wrapped = card.generate_card if getattr(card.generate_card, "_symalign", False) else _wrap(original)
    for name in modules:
        module = sys.modules.get(name) if name != "mergekit.card" else card
        current = getattr(module, "generate_card", None) if module is not None else None
        if current is original:
            module.generate_card = wrapped
