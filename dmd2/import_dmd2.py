"""``python -m dmd2.import_dmd2``: Import an official DMD2 generator as an export (dmd2/io/import_dmd2.py)."""
import sys

import torch

from dmd2.io.import_dmd2 import main

if __name__ == "__main__":
    torch.set_grad_enabled(False)  # inference only
    sys.exit(main())
