"""Shared by the benchmark scripts: write their tables into the docs pages and save plots.

A docs page is hand-written prose around generated regions::

    <!-- generated:NAME -->
    ...replaced by the benchmark that owns NAME...
    <!-- /generated:NAME -->

so rerunning a benchmark refreshes its figures without touching the discussion. A page
without the markers gets the region appended.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
IMAGES = DOCS / "img"


def update_page(page: str, name: str, markdown: str) -> Path:
    """Replace (or append) the generated region ``name`` of ``docs/<page>``."""
    path = DOCS / page
    text = path.read_text() if path.exists() else f"# {Path(page).stem}\n"
    start, end = f"<!-- generated:{name} -->", f"<!-- /generated:{name} -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
    return path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or a clear error."""
    try:
        import matplotlib
    except ImportError as err:  # the bench extra is not part of the plugin's dependencies
        raise SystemExit("the benchmarks' plots need matplotlib: pip install -e '.[bench]' "
                         "(scripts/benchmarks.sh installs it)") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, name: str) -> str:
    """Save under docs/img/ and return the path relative to docs/ (for a Markdown link)."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(IMAGES / name, dpi=110)
    fig.clf()
    return f"img/{name}"
