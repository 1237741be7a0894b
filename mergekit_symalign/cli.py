"""``mergekit-symalign``: the plugin's command line.

    mergekit-symalign report RECIPE.yml OUT_DIR [--cuda] [--cache DIR] [mergekit-yaml options]

``report`` reads an ordinary recipe and, without merging, aligns each model the merge would
align (layer-streamed, with mergekit's planner and loaders, so it refuses exactly what
``mergekit-yaml`` refuses and accepts its options), prints a verdict and writes
``OUT_DIR/report.json``, ``report.md`` and PNG plots (see :mod:`.report`). Nothing is written
when the recipe is refused.
"""

from __future__ import annotations

import sys
from typing import List, Optional

import click
import yaml
from mergekit.options import PrettyPrintHelp, add_merge_options

from .measure import IDENTITY_TOLERANCE

# A refused recipe (the plugin's checks, mergekit's, pydantic's: all ValueError or
# RuntimeError), an unreadable file, or a failure while aligning: reported in one line.
FAILURES = (ValueError, RuntimeError, OSError, yaml.YAMLError)


class _Failed(click.ClickException):
    exit_code = 2


def _load_recipe(path: str, cache: Optional[str]):
    from mergekit.config import MergeConfiguration

    with open(path, "r", encoding="utf-8") as f:
        recipe = yaml.safe_load(f.read())
    if cache is not None and isinstance(recipe, dict):
        recipe["parameters"] = {**(recipe.get("parameters") or {}), "alignment_cache": cache}
    return MergeConfiguration.model_validate(recipe)


@click.group(name="mergekit-symalign")
def cli() -> None:
    """mergekit-symalign: symmetry-aligned merging for mergekit."""


@cli.command("report", cls=PrettyPrintHelp)
@click.argument("recipe")
@click.argument("out_dir")
@click.option("--cache", "cache", default=None, metavar="DIR",
              help="reuse (and save) alignments in DIR, as a merge with alignment_cache: DIR "
                   "does (a recipe's own alignment_cache is used too)")
@click.option("--tolerance", type=float, default=IDENTITY_TOLERANCE, show_default=True,
              help="how close to the identity a solved transform must be to count as moving "
                   "nothing (|s - 1| for scales, ||R - I||_F / sqrt(k) for rotations)")
@add_merge_options
def report_command(merge_options, recipe: str, out_dir: str, cache: Optional[str],
                   tolerance: float) -> None:
    """Align what RECIPE's merge would align, without merging; write OUT_DIR/report.json,
    report.md and plots, and print the verdict."""
    from .report import run_report, write_report

    merge_options.apply_global_options()
    try:
        config = _load_recipe(recipe, cache)
        document = run_report(config, merge_options, recipe=recipe, tol=tolerance)
    except click.ClickException:
        raise
    except FAILURES as err:
        if merge_options.verbosity:
            raise
        raise _Failed(f"{recipe}: {type(err).__name__}: {err}\nNothing was written to "
                      f"{out_dir}. (-v shows the traceback.)") from err
    paths = write_report(document, out_dir)
    for line in document["verdict"]:
        click.echo(line)
    written = ", ".join(paths.values())
    click.echo(f"wrote {written} ({document['seconds']:.1f} s)", err=True)


def main(argv: Optional[List[str]] = None) -> int:
    """The console script: ``mergekit-symalign`` (returns the exit status)."""
    try:
        cli.main(args=argv, prog_name="mergekit-symalign", standalone_mode=False)
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        return 1
    except click.ClickException as err:
        err.show()
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
