"""The demo, the real SmolLM2-135M loader and the demo's helpers (the benchmarks built on its
model family use them too). Not part of the installed package (the wheel holds
``mergekit_symalign`` only): run them from a checkout, e.g. ``python -m examples.demo`` from
the repository root.
"""
