"""The table of a Hydra multirun, printed when the sweep ends (``hydra.callbacks.compare`` in conf/config.yaml):
``python -m dmd2.compare <sweep dir>``'s Markdown table of the jobs' runs, so a ``-m`` sweep ends with its
results. Printing it never fails the sweep."""
from __future__ import annotations

import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepTable(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from dmd2.eval.compare import find_runs, markdown, table

        folder = str(config.hydra.sweep.dir)
        try:
            runs = find_runs([folder])
            text = markdown(*table(runs))
        except Exception as err:  # noqa: BLE001 - the sweep's own outcome stands; the table is a summary
            print(f"[compare] no table of the sweep {folder}: {err}", file=sys.stderr)
            return
        print(f"\n[compare] the sweep's {len(runs)} runs (python -m dmd2.compare {folder} --out <dir> writes the "
              "table, CSV, plots and a contact sheet):")
        sys.stdout.write(text)
        sys.stdout.flush()
