"""``python -m dmd2.import_edm``: Import an NVlabs/edm network pickle as a teacher checkpoint (dmd2/io/import_edm.py)."""
import sys

from dmd2.io.import_edm import main

if __name__ == "__main__":
    sys.exit(main())
