"""``python -m benchmarks.independent_init``: see :mod:`benchmarks.independent_init.run`."""

import sys

from benchmarks.independent_init.run import main

sys.exit(main())
