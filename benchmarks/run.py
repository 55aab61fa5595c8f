"""``python benchmarks/run.py [--json FILE] [--device ...] [--quick]``: the same as ``heterofl bench``
(heterofl_core/bench.py), for a checkout without the package installed as a command."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from heterofl_core.cli import main  # noqa: E402  (after the path is set)

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
