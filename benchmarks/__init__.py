"""The benchmarks behind the figures in docs/: run each from the repository root as
``python -m benchmarks.NAME`` (``scripts/benchmarks.sh`` runs them all). Research code, not
part of the installed package; it uses ``mergekit_symalign``'s public functions only.
"""
