"""``fastadv bench train``: the time-to-robustness table, end to end at a tiny size."""
import json

import pytest

from fastadv import bench_train, cli

TINY = ["--epochs", "1", "--n-train", "256", "--n-test", "128", "--width", "4", "--eval-steps", "2",
        "--threads", "1"]


@pytest.mark.parametrize("interleave", [False, True])
def test_bench_train_cli_rows(tmp_path, capsys, interleave):
    out = tmp_path / "rows.json"
    args = ["bench", "train", *TINY, "--only", "standard", "atta-1", "--json", str(out)]
    if interleave:
        args.append("--interleave")
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| method |") and "× standard" in table[0]
    assert [line.split("|")[1].strip() for line in table[1:]] == ["standard", "atta-1"]
    rows = json.loads(out.read_text())
    assert [r["label"] for r in rows] == ["standard", "atta-1"]
    std, atta = rows
    assert std["time_ratio"] == pytest.approx(1.0)
    assert atta["method"] == "atta" and atta["time_ratio"] > 0 and atta["epochs"] == 1
    for r in rows:
        assert 0 <= r["robust_acc"] <= r["clean_acc"] + 1e-9 <= 1 + 1e-9
        assert r["interleave"] is interleave and len(r["epoch_times_s"]) == 1
        assert not r["meets_target"]          # no PGD reference row: nothing to meet


def test_bench_train_cli_unknown_row(capsys):
    assert cli.main(["bench", "train", *TINY, "--only", "nope"]) == 2
    assert "no rows named" in capsys.readouterr().out


def test_interleaved_training_gives_the_same_models():
    """Round-robin epochs (fit continued) train the same models as one fit() per row."""
    kw = dict(epochs=2, n_train=128, n_test=64, width=4, eval_steps=2, threads=1, log=lambda m: None)
    specs = [s for s in bench_train.SPECS if s[0] in ("standard", "atta-1")]
    a = bench_train.train_table(specs, **kw)
    b = bench_train.train_table(specs, interleave=True, **kw)
    for ra, rb in zip(a, b):
        assert (ra["clean_acc"], ra["robust_acc"], ra["guard_curve"]) == \
               (rb["clean_acc"], rb["robust_acc"], rb["guard_curve"])
