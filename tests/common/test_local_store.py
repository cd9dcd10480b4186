"""LocalStore's writes: the folder check made once per folder still refuses links out of the store."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from imgsift_common.storage import InvalidKey, LocalStore


def test_a_folder_removed_after_a_write_is_made_again(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    store.put("jobs/j1/images/a.jpg", b"a")
    shutil.rmtree(tmp_path / "objects" / "jobs")  # e.g. a job's objects deleted while the store lives on
    store.put("jobs/j1/images/b.jpg", b"b")
    assert store.get("jobs/j1/images/b.jpg") == b"b"
    assert not store.exists("jobs/j1/images/a.jpg")


def test_writes_are_whole_private_files_without_temp_leftovers(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    data = os.urandom(3 * 65536 + 5)
    store.put("jobs/j1/images/a.jpg", data)
    store.put("jobs/j1/images/a.jpg", data[:10])  # replaced whole
    store.put("jobs/j1/images/empty.jpg", b"")
    folder = tmp_path / "objects" / "jobs" / "j1" / "images"
    assert sorted(p.name for p in folder.iterdir()) == ["a.jpg", "empty.jpg"]
    assert store.get("jobs/j1/images/a.jpg") == data[:10] and store.get("jobs/j1/images/empty.jpg") == b""
    assert stat.S_IMODE((folder / "a.jpg").stat().st_mode) == 0o600  # as tempfile.mkstemp made them


def test_a_link_out_of_the_store_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    store = LocalStore(tmp_path / "objects")
    store.put("jobs/j1/images/a.jpg", b"a")  # a folder checked and remembered
    (tmp_path / "objects" / "jobs" / "j2").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidKey):
        store.put("jobs/j2/images/b.jpg", b"b")
    with pytest.raises(InvalidKey):
        store.put("jobs/j2/b.jpg", b"b")
    (tmp_path / "objects" / "jobs" / "j1" / "images" / "link.jpg").symlink_to(outside / "x.jpg")
    store.put("jobs/j1/images/link.jpg", b"c")  # the link itself is replaced, never written through
    assert not (outside / "x.jpg").exists() and list(outside.iterdir()) == []
    assert store.get("jobs/j1/images/link.jpg") == b"c"
