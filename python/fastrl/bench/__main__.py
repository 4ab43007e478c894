"""``python -m fastrl.bench``: see :func:`fastrl.bench.runner.main`."""
import sys

from fastrl.bench.runner import main

sys.exit(main())
