"""The JIT cache key follows the compilers; a nvcc/torch CUDA major-version mismatch is one line."""
import os
import stat

import pytest
import torch

from fastadv import _build

ROOT = _build.source_root()


def _fake_tool(path, text):
    path.write_text(f"#!/bin/sh\necho '{text}'\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.fixture(autouse=True)
def _fresh_versions():
    _build._version_line.cache_clear()
    yield
    _build._version_line.cache_clear()


@pytest.mark.skipif(os.name == "nt", reason="shell scripts stand in for compilers")
def test_cache_key_changes_with_the_host_compiler(tmp_path, monkeypatch):
    keys = []
    for version in ("12.2.0", "13.1.0"):
        monkeypatch.setenv("CXX", _fake_tool(tmp_path / f"cxx-{version}", f"g++ (Debian) {version}"))
        variant = _build._variant(ROOT, False, "")
        assert version in variant["toolchain"]["cxx"]
        keys.append(_build.variant_key(variant))
    assert keys[0] != keys[1]
    assert keys[1] == _build.variant_key(_build._variant(ROOT, False, ""))  # stable for one compiler


@pytest.mark.skipif(os.name == "nt", reason="shell scripts stand in for compilers")
def test_cache_key_changes_with_nvcc(tmp_path, monkeypatch):
    keys = []
    for release in ("12.6, V12.6.85", "13.0, V13.0.88"):
        home = tmp_path / release.split(",")[0]
        (home / "bin").mkdir(parents=True)
        _fake_tool(home / "bin" / "nvcc", f"Cuda compilation tools, release {release}")
        monkeypatch.setattr(_build, "cuda_toolkit", lambda home=home: str(home))
        tools = _build.toolchain(cuda=True)
        assert release in tools["nvcc"]
        keys.append(_build.variant_key(_build._variant(ROOT, True, "9.0")))
    assert keys[0] != keys[1]
    assert "nvcc" not in _build.toolchain(cuda=False)


@pytest.mark.skipif(os.name == "nt", reason="shell scripts stand in for compilers")
def test_cuda_major_mismatch_is_one_line_saying_what_to_do(tmp_path, monkeypatch):
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    _fake_tool(home / "bin" / "nvcc", "Cuda compilation tools, release 13.0, V13.0.88")
    monkeypatch.setattr(_build, "cuda_toolkit", lambda: str(home))
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    msg = _build.cuda_version_mismatch()
    assert msg is not None and "\n" not in msg
    assert "CUDA 13.0" in msg and "12.6" in msg and "CUDA_HOME" in msg and "CUDA 12.x" in msg
    assert _build.cuda_skip_reason() == msg  # the JIT build leaves CUDA out, saying why
    monkeypatch.setattr(torch.version, "cuda", "13.2")  # minor versions may differ
    assert _build.cuda_version_mismatch() is None
    assert _build.cuda_skip_reason() is None
    monkeypatch.setattr(torch.version, "cuda", None)
    assert _build.cuda_version_mismatch() is None
