"""The benchmarks behind the figures in docs/: run each from the repository root as
``python -m benchmarks.NAME`` (``scripts/benchmarks.sh`` runs them all). Research code, not
part of the installed package. From ``mergekit_symalign`` it uses public names only; it reuses
the demo's helpers (``examples/common.py``) and the tests' merge helpers (``tests/support.py``);
``docs_pages`` writes the generated regions of the docs pages.
"""
