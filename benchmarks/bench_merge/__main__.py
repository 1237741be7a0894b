"""``python -m benchmarks.bench_merge``: see :mod:`benchmarks.bench_merge.run`."""

from benchmarks.bench_merge.run import main

main()
