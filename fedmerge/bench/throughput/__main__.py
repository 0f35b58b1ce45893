"""``python -m fedmerge.bench.throughput``: the engine throughput benchmark (see the package)."""

import sys

from . import main

sys.exit(main())
