"""The report's progress: one bar (or printed line) per attack, with the total AutoAttack gives
as the attack starts."""
import sys

import pytest

from fastadv.eval import report


def test_progress_lines_without_tqdm_show_each_attacks_total(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)   # import fails: printed lines instead
    cb, close = report._progress_factory(True)
    cb("apgd-ce", 0, 12)
    cb("apgd-ce", 8, 12)
    cb("apgd-ce", 4, 12)
    cb("apgd-t", 0, 5)
    cb("apgd-t", 5, 5)
    close()
    assert capsys.readouterr().out.splitlines() == [
        "  apgd-ce: 12 points to attack", "  apgd-ce: 8/12 points", "  apgd-ce: 12/12 points",
        "  apgd-t: 5 points to attack", "  apgd-t: 5/5 points"]


def test_progress_bars_get_the_total_at_the_start(monkeypatch):
    tqdm_auto = pytest.importorskip("tqdm.auto")
    bars = []

    class Bar:
        def __init__(self, desc=None, total=None, **kw):
            self.desc, self.total, self.n, self.closed = desc, total, 0, False
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            self.closed = True
    monkeypatch.setattr(tqdm_auto, "tqdm", Bar)
    cb, close = report._progress_factory(True, " (rank 0's shard)")
    cb("square", 0, 3)
    assert [(b.desc, b.total, b.n) for b in bars] == [("square (rank 0's shard)", 3, 0)]
    cb("square", 3, 3)
    close()
    assert bars[0].n == 3 and bars[0].closed
    off, _ = report._progress_factory(False)
    off("square", 0, 3)      # disabled: nothing happens, with or without a total
    off("square", 1)
