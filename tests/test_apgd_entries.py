"""entry_chunks: points × targets × restarts laid out as entries and cut into chunks (APGD, FAB, Square)."""
import torch

from fastadv.attacks._groups import entry_chunks


def _batch(b=5):
    x = torch.arange(b, dtype=torch.float32).reshape(b, 1, 1, 1).expand(b, 1, 2, 2).contiguous()
    y = torch.arange(b) + 10
    eps = torch.arange(b, dtype=torch.float32) / 10
    return x, y, eps


def test_layout_is_point_then_target_then_restart():
    x, y, eps = _batch()
    targets = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]])
    todo = torch.tensor([1, 3])
    (E,) = list(entry_chunks(todo, x, y, targets, eps, n_restarts=2, max_rows=None))
    assert E.n_points == 2 and E.pts.tolist() == [1, 3]
    assert E.x[:, 0, 0, 0].tolist() == [1.0] * 4 + [3.0] * 4
    assert E.y.tolist() == [11] * 4 + [13] * 4
    assert E.target.tolist() == [2, 2, 3, 3, 6, 6, 7, 7]
    assert torch.allclose(E.eps, torch.tensor([0.1] * 4 + [0.3] * 4))
    assert E.group.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert E.restart.tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    assert E.per_point_sum(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])).tolist() == [10, 26]


def test_chunks_hold_at_most_max_rows_and_every_point_once():
    x, y, eps = _batch()
    todo = torch.tensor([0, 2, 3, 4])
    got = list(entry_chunks(todo, x, y, None, eps, n_restarts=3, max_rows=7))
    # 3 entries per point: 2 points (6 rows) fit in 7
    assert [E.pts.tolist() for E in got] == [[0, 2], [3, 4]]
    assert all(E.target is None and E.x.shape[0] == 6 for E in got)
    # a point with more entries than max_rows still gets a chunk of its own
    got = list(entry_chunks(todo, x, y, None, eps, n_restarts=3, max_rows=2))
    assert [E.pts.tolist() for E in got] == [[0], [2], [3], [4]]
    assert list(entry_chunks(todo[:0], x, y, None, eps, n_restarts=3, max_rows=2)) == []
