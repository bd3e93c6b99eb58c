"""Atomic writes: a file appears whole or not at all, and no temporary file is ever left behind."""

from __future__ import annotations

import stat

import pytest

from deployer.atomic import write_atomic


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_writes_text_with_newlines_and_an_ordinary_mode(tmp_path):
    path = write_atomic(tmp_path / "deep" / "er" / "x.toml", "a = 1\nb = 'é'\n")
    assert path.read_bytes() == "a = 1\nb = 'é'\n".encode()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert _leftovers(path.parent) == []


def test_replaces_an_existing_file_unless_exclusive(tmp_path):
    path = tmp_path / "x.txt"
    write_atomic(path, "old")
    write_atomic(path, "new")
    assert path.read_text() == "new"
    with pytest.raises(FileExistsError):
        write_atomic(path, "newer", exclusive=True)
    assert path.read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "app.py"
    target.mkdir()  # a folder where the file should go: the rename fails
    (target / "keep").write_text("kept")
    with pytest.raises(OSError):
        write_atomic(target, "print('hi')\n")
    assert (target / "keep").read_text() == "kept"
    assert _leftovers(tmp_path) == []


def test_text_that_cannot_be_encoded_leaves_nothing(tmp_path):
    with pytest.raises(UnicodeEncodeError):
        write_atomic(tmp_path / "x.txt", "lone surrogate \udc80")
    assert list(tmp_path.iterdir()) == []
