"""``python -m dmd2.export``: Export a generator from a distillation checkpoint (dmd2/io/export.py)."""
import sys

import torch

from dmd2.io.export import main

if __name__ == "__main__":
    torch.set_grad_enabled(False)  # inference only
    sys.exit(main())
