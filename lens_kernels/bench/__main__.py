"""``python -m lens_kernels.bench``: the same as the ``lens-bench`` console script."""
import sys

from .cli import main

sys.exit(main())
