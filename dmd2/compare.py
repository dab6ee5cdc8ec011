"""``python -m dmd2.compare``: Compare runs: metrics grouped by the settings that differ (dmd2/eval/compare.py)."""
import sys

from dmd2.eval.compare import main

if __name__ == "__main__":
    sys.exit(main())
