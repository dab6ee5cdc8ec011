"""Checkpoint layouts: checkpoint file names are written and read by one pair of functions."""
from __future__ import annotations

from dmd2.io.checkpoint import checkpoint_name, checkpoint_step


def test_checkpoint_file_names_are_written_and_read_by_one_pair_of_functions():
    assert checkpoint_name("dmd2", 10) == "dmd2_000010.pt" and checkpoint_name("teacher", "final") == "teacher_final.pt"
    assert checkpoint_name("teacher", 1234567) == "teacher_1234567.pt"
    assert checkpoint_step("teacher_000010.pt", "teacher") == 10 and checkpoint_step("dmd2_final.pt", "dmd2") == "final"
    for name in ("dmd2_000010.pt", "teacher_x.pt", "teacher_000010.pt.tmp", "teacher_.pt", "my_teacher_000010.pt"):
        assert checkpoint_step(name, "teacher") is None, name
