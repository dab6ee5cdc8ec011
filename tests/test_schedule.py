"""The schedule a run prints at its start (dmd2.train.plan) agrees with the rules the runners apply."""
from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import pytest

from dmd2.train.plan import describe_schedule, log_schedule


def runner_events(steps: int, every: int, final_is_separate: bool, at_zero: bool = False) -> int:
    """How often the runners act for ``every``: checkpoints at done % every == 0 except the last step, plus the
    final one; evaluations and grids at done % every == 0 or the last step (distill evaluation also at 0)."""
    if final_is_separate:
        return sum(1 for done in range(1, steps + 1) if done % every == 0 and done != steps) + 1
    return sum(1 for done in range(1, steps + 1) if done % every == 0 or done == steps) + int(at_zero)


def count(text: str, what: str) -> int:
    line = next(line for line in text.splitlines() if line.strip().startswith(what))
    return int(re.search(r"\((\d+) in all", line).group(1))


@pytest.mark.parametrize("steps,every", [(400, 100), (401, 100), (399, 100), (10, 3), (5, 5), (4, 10), (1, 1)])
def test_counts_match_the_runner_rules(steps, every):
    text, _ = describe_schedule("distill", steps, 10, 0, 0, every, every, every)
    assert count(text, "checkpoints") == runner_events(steps, every, final_is_separate=True)
    assert count(text, "sample grids") == runner_events(steps, every, final_is_separate=False)
    assert count(text, "evaluation") == runner_events(steps, every, final_is_separate=False, at_zero=True)
    teacher, _ = describe_schedule("teacher", steps, 10, 0, 0, every, every, every)
    assert count(teacher, "evaluation") == runner_events(steps, every, final_is_separate=False)


def test_the_text_names_steps_epochs_warmup_and_intervals():
    text, warnings = describe_schedule("teacher", 1000, 200, 300, 100, 0, 250, 0)
    assert text.splitlines()[0] == "[teacher] schedule: 1000 steps = 5 epochs of 200 steps, resuming at step 300"
    assert "full learning rate from step 100" in text
    assert "evaluation: off (eval_every=0)" in text
    assert "checkpoints: every 250 steps and at the end (4 in all)" in text
    assert "sample grids: at the end only" in text
    assert warnings == []


def test_a_warmup_longer_than_the_run_is_a_warning():
    _, warnings = describe_schedule("distill", 400, 100, 0, 1000, 0, 100, 0)
    assert len(warnings) == 1 and "warmup_steps = 1000 is longer than the run (400 steps)" in warnings[0]
    assert "40%" in warnings[0]
    assert describe_schedule("distill", 1000, 100, 0, 1000, 0, 100, 0)[1] == []


def test_log_schedule_logs_on_rank_0_only(caplog):
    cfg = SimpleNamespace(stage="teacher", warmup_steps=50, eval_every=0, save_every=10, sample_every=0)
    with caplog.at_level(logging.INFO, logger="dmd2.train.plan"):
        log_schedule(cfg, 20, 5, 0, is_main=False)
        assert caplog.records == []
        log_schedule(cfg, 20, 5, 0, is_main=True)
    levels = [(r.levelno, r.getMessage().splitlines()[0]) for r in caplog.records]
    assert levels[0] == (logging.INFO, "[teacher] schedule: 20 steps = 4 epochs of 5 steps")
    assert levels[1][0] == logging.WARNING and "warmup_steps = 50" in levels[1][1]
