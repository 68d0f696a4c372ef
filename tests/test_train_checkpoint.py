"""Checkpoint files: a checksum refuses any changed byte, a damaged last.pt is named in one
line and the previous good checkpoint is resumed from, an unwritable checkpoint_dir is
refused before training, and checkpoints written before checksums still load."""
import io
import os
import random
import warnings

import pytest
import torch

from fastadv import data, models
from fastadv.train import AdversarialTrainer
from fastadv.train import checkpoint as ckpt


def _setup(seed_data=3):
    x, y = data.load_digits()
    x, y = x[:48], y[:48]
    torch.manual_seed(0)
    model = models.SmallCNN(width=4, input_size=8, batchnorm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    tr = AdversarialTrainer(model, opt, method="fgsm_rs", eps=0.1, seed=1)
    loader = data.make_loader(x, y, batch_size=16, seed=seed_data)
    return tr, model, loader


def _fit(tr, loader, ckpt_dir, epochs, **kw):
    return tr.fit(loader, epochs=epochs, checkpoint_dir=ckpt_dir, guard=False, verbose=False, **kw)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            bool((a == b).all() if not a.is_floating_point() else torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    return a == b


def _one_line_error(excinfo, *names):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for n in names:
        assert n in msg, msg
    return msg


# ------------------------------------------------------------------ the checksum
def test_every_flipped_byte_is_refused_or_harmless(tmp_path):
    tr, _, loader = _setup()
    _fit(tr, loader, str(tmp_path / "ck"), 1)
    path = str(tmp_path / "ck" / "last.pt")
    raw = open(path, "rb").read()
    good = ckpt.load_checkpoint(path)
    rng = random.Random(0)
    # the zip structure at the end (central directory, end records, the checksum: the last
    # 200 bytes each, a sample of the 4 kB before) and a sample of everything before it
    # (pickle, tensors, local headers)
    tail = set(range(len(raw) - 200, len(raw))) | set(rng.sample(range(len(raw) - 4096, len(raw)), 250))
    positions = sorted(tail | set(rng.sample(range(len(raw)), 150)))
    bad_path = str(tmp_path / "bad.pt")
    refused = harmless = 0
    for i in positions:
        b = bytearray(raw)
        b[i] ^= 0xFF if i % 2 else 0x01
        with open(bad_path, "wb") as f:
            f.write(bytes(b))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = ckpt.load_checkpoint(bad_path)
        except ckpt.CheckpointError as exc:
            assert "\n" not in str(exc) and bad_path in str(exc)
            refused += 1
            continue
        # only a flip inside the checksum's own tag makes the file read as one without a
        # checksum; the zip CRCs then vouch for the unchanged contents
        assert _same(got, good), f"byte {i}: changed content loaded silently"
        harmless += 1
    assert refused >= len(positions) - 20, (refused, harmless)


def test_flipped_weight_byte_in_last_pt_resumes_from_previous(tmp_path):
    """The reported case: a byte flipped in a weight of last.pt trained on silently. Now
    the run names last.pt, resumes from previous.pt and still ends bit-exactly."""
    torch.set_num_threads(1)
    tr, model, loader = _setup()
    _fit(tr, loader, str(tmp_path / "full"), 3)
    want = {k: v.clone() for k, v in model.state_dict().items()}

    d = str(tmp_path / "ck")
    tr, _, loader = _setup()
    _fit(tr, loader, d, 2)
    assert sorted(f for f in os.listdir(d) if f.endswith(".pt")) == ["last.pt", "previous.pt"]
    prev = torch.load(os.path.join(d, "previous.pt"), weights_only=True)
    assert prev["epoch"] == 1 and torch.load(os.path.join(d, "last.pt"), weights_only=True)["epoch"] == 2
    # flip the exponent byte of a weight, as a bad sector or a bit flip in RAM would
    raw = bytearray(open(os.path.join(d, "last.pt"), "rb").read())
    w = torch.load(os.path.join(d, "last.pt"), weights_only=True)["model"]["features.0.weight"]
    at = bytes(raw).find(w.flatten()[:4].numpy().tobytes())
    assert at > 0
    raw[at + 3] ^= 0x40
    open(os.path.join(d, "last.pt"), "wb").write(bytes(raw))
    assert torch.load(os.path.join(d, "last.pt"), weights_only=True)["model"]["features.0.weight"] \
        .abs().max() > 1e30   # torch alone would have taken it

    tr, model, loader = _setup()
    with pytest.warns(RuntimeWarning, match="last.pt: checksum mismatch.*previous good checkpoint .*previous.pt"):
        hist = _fit(tr, loader, d, 3)
    assert [r["epoch"] for r in hist] == [1, 2, 3]
    for k, v in want.items():
        assert torch.equal(v, model.state_dict()[k]), k


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "evil", "not_a_dict"])
def test_damaged_last_pt_named_in_one_line(tmp_path, damage):
    d = tmp_path / "ck"
    tr, _, loader = _setup()
    _fit(tr, loader, str(d), 1)
    last = d / "last.pt"
    raw = last.read_bytes()
    pwned = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.makedirs, (str(pwned),))

    if damage == "truncated":
        last.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        last.write_bytes(bytes(random.Random(1).randrange(256) for _ in range(5000)))
    elif damage == "empty":
        last.write_bytes(b"")
    elif damage == "evil":
        torch.save({"format": "fastadv.train/1", "x": Evil()}, str(last))
    else:
        ckpt.save_checkpoint([1, 2, 3], str(last))
    # no previous checkpoint: a clear error, before any training
    tr, _, loader = _setup()
    with pytest.raises(ckpt.CheckpointError) as ei:
        _fit(tr, loader, str(d), 2, on_batch_end=lambda *a: pytest.fail("trained"))
    msg = _one_line_error(ei, str(last), "no previous good checkpoint")
    assert {"truncated": "truncated", "garbage": "not a checkpoint", "empty": "empty",
            "evil": "safe loader", "not_a_dict": "not a fastadv trainer checkpoint"}[damage] in msg
    assert not pwned.exists()
    assert isinstance(ei.value, ValueError)
    # with a previous good one it is used, and the warning is one line naming both files
    tr, _, loader = _setup()
    _fit(tr, loader, str(tmp_path / "ck2"), 2)
    (tmp_path / "ck2" / "last.pt").write_bytes(last.read_bytes())
    tr, _, loader = _setup()
    with pytest.warns(RuntimeWarning) as rec:
        hist = _fit(tr, loader, str(tmp_path / "ck2"), 2)
    msgs = [str(w.message) for w in rec if "previous good checkpoint" in str(w.message)]
    assert len(msgs) == 1 and "\n" not in msgs[0] and "previous.pt" in msgs[0]
    assert [r["epoch"] for r in hist] == [1, 2]
    assert not pwned.exists()


def test_load_checkpoint_of_a_directory_falls_back_and_refuses_when_nothing_is_good(tmp_path):
    d = str(tmp_path / "ck")
    tr, _, loader = _setup()
    _fit(tr, loader, d, 2)
    os.remove(os.path.join(d, "last.pt"))          # a kill between the two renames of a save
    tr2, _, _ = _setup()
    with pytest.warns(RuntimeWarning, match="last.pt: missing"):
        tr2.load_checkpoint(d)
    assert tr2.epoch == 1
    open(os.path.join(d, "previous.pt"), "wb").write(b"PK\x03\x04 torn")
    with pytest.raises(ckpt.CheckpointError) as ei:
        _setup()[0].load_checkpoint(d)
    _one_line_error(ei, "last.pt: missing", "previous.pt", "no previous good checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="no such file"):
        _setup()[0].load_checkpoint(str(tmp_path / "empty_dir_does_not_exist.pt"))


def test_another_runs_checkpoint_never_becomes_previous(tmp_path):
    d = str(tmp_path / "ck")
    tr, _, loader = _setup()
    _fit(tr, loader, d, 2)
    old_last = open(os.path.join(d, "last.pt"), "rb").read()
    # a new run that does not resume writes over it: neither the old last.pt nor the old
    # previous.pt may be left as this run's fallback
    tr, _, loader = _setup(seed_data=4)
    _fit(tr, loader, d, 1, resume=False)
    assert not os.path.exists(os.path.join(d, "previous.pt"))
    assert open(os.path.join(d, "last.pt"), "rb").read() != old_last
    _fit(tr, loader, d, 2)     # a second fit() of the same trainer continues: now it rotates
    assert torch.load(os.path.join(d, "previous.pt"), weights_only=True)["epoch"] == 1
    assert sorted(os.listdir(d)) == ["last.pt", "previous.pt"]   # no temporary left behind


def test_checkpoints_without_a_checksum_still_load_with_a_note(tmp_path):
    """Files written before checksums (plain torch.save): loaded, with a one-line note, and
    still checked against the zip CRCs."""
    d = str(tmp_path / "ck")
    tr, _, loader = _setup()
    _fit(tr, loader, d, 1)
    state = torch.load(os.path.join(d, "last.pt"), weights_only=True)
    torch.save(state, os.path.join(d, "last.pt"))       # the old writer: no checksum
    tr, model, loader = _setup()
    with pytest.warns(UserWarning, match="before checkpoints carried a checksum") as rec:
        tr.load_checkpoint(d)
    notes = [w for w in rec if "checksum" in str(w.message)]
    assert len(notes) == 1 and "\n" not in str(notes[0].message)
    assert torch.equal(model.state_dict()["features.0.weight"], state["model"]["features.0.weight"])
    # a flipped byte in such a file is still caught, by the zip CRC of its record
    raw = bytearray(open(os.path.join(d, "last.pt"), "rb").read())
    at = bytes(raw).find(state["model"]["features.0.weight"].flatten()[:4].numpy().tobytes())
    raw[at + 3] ^= 0x40
    open(os.path.join(d, "last.pt"), "wb").write(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match="CRC mismatch"):
        _setup()[0].load_checkpoint(os.path.join(d, "last.pt"))


def test_checkpoint_files_stay_plain_torch_files(tmp_path):
    p = str(tmp_path / "c.pt")
    ckpt.save_checkpoint({"a": torch.arange(5), "n": 1}, p)
    assert torch.load(p, weights_only=True)["n"] == 1          # torch reads them as they are
    ckpt.verify_checkpoint(p)
    with pytest.raises(ckpt.CheckpointError, match="no such file"):
        ckpt.load_checkpoint(str(tmp_path / "missing.pt"))


def test_weights_files_are_verified(tmp_path):
    m = models.SmallCNN(width=4, input_size=8)
    for name in ("w.pt", "w.safetensors"):
        if name.endswith(".safetensors"):
            pytest.importorskip("safetensors")
        p = str(tmp_path / name)
        ckpt.save_weights(m.state_dict(), p, {"epoch": 3})
        sd, meta = ckpt.load_weights_and_metadata(p)
        assert str(meta["epoch"]) == "3" and all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
        raw = bytearray(open(p, "rb").read())
        at = bytes(raw).find(m.state_dict()["features.0.weight"].flatten()[:4].numpy().tobytes())
        raw[at + 3] ^= 0x40
        open(p, "wb").write(bytes(raw))
        with pytest.raises(ckpt.CheckpointError, match="checksum mismatch"):
            ckpt.load_weights(p)


def test_corrupted_best_pt_is_named_and_the_run_goes_on(tmp_path, monkeypatch):
    d = str(tmp_path / "ck")
    x, y = data.load_digits()
    tr, _, loader = _setup()
    val = data.make_loader(x[100:132], y[100:132], batch_size=32, shuffle=False)
    tr.fit(loader, epochs=1, val_loader=val, checkpoint_dir=d, guard_size=8, guard_steps=1, verbose=False)
    best = os.path.join(d, "best.pt")
    raw = bytearray(open(best, "rb").read())
    at = bytes(raw).find(ckpt.load_weights(best)["features.0.weight"].flatten()[:4].numpy().tobytes())
    raw[at + 3] ^= 0x40
    open(best, "wb").write(bytes(raw))
    tr, _, loader = _setup()
    with pytest.warns(RuntimeWarning, match="best.pt.*cannot be restored"):
        hist = tr.fit(loader, epochs=2, val_loader=val, checkpoint_dir=d, guard_size=8, guard_steps=1,
                      verbose=False)
    assert len(hist) == 2


# ------------------------------------------------------------------ checkpoint_dir
def _no_training(*a):
    pytest.fail("training started before checkpoint_dir was checked")


def test_unwritable_checkpoint_dir_is_refused_before_training(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    cases = [(str(a_file), "not a directory"), (str(a_file / "sub"), "cannot create"),
             ("/proc/fastadv-checkpoints", "cannot create"), ("/proc", "cannot write")]
    for path, what in cases:
        tr, _, loader = _setup()
        with pytest.raises(ValueError) as ei:
            _fit(tr, loader, path, 1, on_batch_end=_no_training)
        _one_line_error(ei, "checkpoint_dir", path, what)
    with pytest.raises(TypeError, match="checkpoint_dir"):
        _fit(_setup()[0], loader, 3, 1)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes read-only directories")
def test_read_only_checkpoint_dir_is_refused_before_training(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        tr, _, loader = _setup()
        with pytest.raises(ValueError, match="checkpoint_dir: cannot write files in"):
            _fit(tr, loader, str(d), 1, on_batch_end=_no_training)
    finally:
        d.chmod(0o700)


def test_checksum_sits_in_the_zip_comment(tmp_path):
    """The format: torch's archive with a comment 'fastadv-sha256:<hex of every byte before it>'."""
    import hashlib
    import zipfile
    p = str(tmp_path / "c.pt")
    ckpt.save_checkpoint({"a": torch.ones(3)}, p)
    raw = open(p, "rb").read()
    comment = zipfile.ZipFile(io.BytesIO(raw)).comment
    assert comment.startswith(b"fastadv-sha256:")
    assert comment[15:] == hashlib.sha256(raw[: len(raw) - len(comment)]).hexdigest().encode()
    # bytes added after it (a torn append, two writers) are refused too
    open(p, "ab").write(b"x")
    with pytest.raises(ckpt.CheckpointError, match="added or lost at its end"):
        ckpt.load_checkpoint(p)


def test_read_only_file_system_is_refused_before_training(tmp_path, monkeypatch):
    """As root a chmod'ed directory stays writable: a read-only file system is simulated
    where the probe writes (EROFS from creating its file)."""
    import errno

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(ckpt.tempfile, "mkstemp", read_only)
    tr, _, loader = _setup()
    with pytest.raises(ValueError) as ei:
        _fit(tr, loader, str(tmp_path / "ck"), 1, on_batch_end=_no_training)
    _one_line_error(ei, "checkpoint_dir: cannot write files in", "Read-only file system")
