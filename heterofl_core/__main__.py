"""``python -m heterofl_core`` runs the ``heterofl`` command line."""

import sys

from .cli import main

sys.exit(main())
