"""``python -m cupyconv.demo``: the same as ``python -m cupyconv demo``."""

import sys

from .train import main

sys.exit(main())
