"""The pinned dataset directory and per-process handles (jasper.files), and safe .pt loading."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from jasper.errors import DatasetNotFoundError, FormatError, ShapeError, UnsafeFileError
from jasper.files import DatasetChangedError, DatasetDir, OutsideDatasetError, ProcessLocal
from jasper.ptload import load_pt, load_pt_tensor


def _dataset(path: Path, content: bytes = b"v1") -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(f'{{"v": "{content.decode()}"}}')
    (path / "a.bin").write_bytes(content)
    return path


def test_symlinked_member_is_refused_naming_it(tmp_path: Path) -> None:
    d = _dataset(tmp_path / "ds")
    outside = tmp_path / "secret"
    outside.write_bytes(b"not yours")
    (d / "b.bin").symlink_to(outside)
    files = DatasetDir(d)
    with pytest.raises(OutsideDatasetError, match="b.bin.*symbolic link") as e:
        files.read_bytes("b.bin")
    assert isinstance(e.value, UnsafeFileError) and e.value.path == d / "b.bin"
    assert DatasetDir(d, follow_links=True).read_bytes("b.bin") == b"not yours"  # opted in


def test_self_symlink_directory_fifo_and_bad_names_are_typed(tmp_path: Path) -> None:
    d = _dataset(tmp_path / "ds")
    (d / "loop").symlink_to(d / "loop")
    (d / "sub").mkdir()
    os.mkfifo(d / "fifo")
    files = DatasetDir(d)
    for name in ("loop", "sub", "fifo"):  # the FIFO must not block the open
        with pytest.raises(OutsideDatasetError, match=name):
            files.open_fd(name)
    with pytest.raises(OutsideDatasetError):
        DatasetDir(d, follow_links=True).open_fd("loop")
    for name in ("..", "../ds/a.bin", "/etc/passwd", "", "."):
        with pytest.raises(OutsideDatasetError, match="plain file name"):
            files.open_fd(name)
    with pytest.raises(DatasetNotFoundError):
        files.open_fd("missing.bin")


def test_pinned_directory_keeps_reading_the_generation_it_opened(tmp_path: Path) -> None:
    d = _dataset(tmp_path / "ds", b"v1")
    files = DatasetDir(d)
    files.pin()
    new = _dataset(tmp_path / "new", b"v2")
    os.rename(d, tmp_path / "old")
    os.rename(new, d)  # a writer commits a new version at the same path
    assert files.read_bytes("a.bin") == b"v1"
    assert DatasetDir(d).read_bytes("a.bin") == b"v2"


def test_swap_while_pinning_pins_the_new_version_whole(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit that swaps the directory and starts deleting the old one while a reader is
    listing it must not leave the reader with half a version (members that are gone by name)."""
    target = _dataset(tmp_path / "ds", b"v1")
    new = _dataset(tmp_path / "new", b"v2")
    real_identity = DatasetDir._identity
    swapped = []

    def identity_then_commit(self: DatasetDir, fd: int) -> object:
        gen = real_identity(self, fd)
        if not swapped:  # the writer commits between the reader's open and its listing
            swapped.append(True)
            aside = tmp_path / "old"
            os.rename(target, aside)
            os.rename(new, target)
            (aside / "a.bin").unlink()  # the old version is being deleted, file by file
        return gen

    monkeypatch.setattr(DatasetDir, "_identity", identity_then_commit)
    files = DatasetDir(target)
    files.pin()
    assert swapped
    assert files.read_bytes("config.json") == b'{"v": "v2"}'
    with os.fdopen(files.open_fd("a.bin"), "rb") as f:
        assert f.read() == b"v2"


def test_pickled_dir_detects_a_replaced_dataset(tmp_path: Path) -> None:
    d = _dataset(tmp_path / "ds", b"v1")
    files = DatasetDir(d)
    files.pin()
    blob = pickle.dumps(files)
    assert pickle.loads(blob).read_bytes("a.bin") == b"v1"  # unchanged: reopens fine
    os.rename(d, tmp_path / "old")
    _dataset(d, b"v2")
    with pytest.raises(DatasetChangedError, match="replaced by a new version"):
        pickle.loads(blob).read_bytes("a.bin")


class _Opener:
    def __init__(self) -> None:
        self.opened: list[int] = []

    def __call__(self) -> tuple[int, object]:
        self.opened.append(os.getpid())
        return (os.getpid(), object())


def test_process_local_reopens_after_fork_and_pickles_without_handle() -> None:
    local: ProcessLocal[tuple[int, object]] = ProcessLocal(_Opener())
    parent = local.get()
    assert local.get() is parent and local.is_open
    clone = pickle.loads(pickle.dumps(local))
    assert not clone.is_open and clone.get()[0] == os.getpid()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            child = local.get()
            os.write(w, b"\x00" if child is not parent and child[0] == os.getpid() else b"\x01")
        finally:
            os._exit(0)
    os.close(w)
    status = os.read(r, 1)
    os.waitpid(pid, 0)
    os.close(r)
    assert status == b"\x00"
    assert local.get() is parent


# --- safe .pt loading --------------------------------------------------------------------------
class _Canary:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


def test_pt_zeroed_header_is_corrupt_not_legacy_tar(tmp_path: Path) -> None:
    d = _dataset(tmp_path / "ds")
    torch.save(torch.arange(10), d / "x.pt")
    data = bytearray((d / "x.pt").read_bytes())
    data[:64] = bytes(64)
    (d / "x.pt").write_bytes(data)
    (d / "zero.pt").write_bytes(bytes(1000))
    files = DatasetDir(d)
    for name in ("x.pt", "zero.pt"):
        with pytest.raises(FormatError, match="not a .pt file") as e:
            load_pt(files, name, array="x")
        assert not isinstance(e.value, UnsafeFileError) and "legacy" not in str(e.value)


def test_pt_unsafe_pickle_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    d = _dataset(tmp_path / "ds")
    canary = tmp_path / "canary"
    torch.save({"t": torch.zeros(2), "evil": _Canary(str(canary))}, d / "evil.pt")
    with pytest.raises(UnsafeFileError, match="evil.pt"):
        load_pt(DatasetDir(d), "evil.pt", mmap=True)
    assert not canary.exists()


def test_pt_aliasing_strides_are_refused(tmp_path: Path) -> None:
    d = _dataset(tmp_path / "ds")
    torch.save(torch.zeros(1, 4).expand(5, 4), d / "alias.pt")
    with pytest.raises(ShapeError, match="alias.pt: alias has stride 0"):
        load_pt_tensor(DatasetDir(d), "alias.pt", mmap=True, array="alias")
    torch.save(torch.arange(12).reshape(3, 4), d / "ok.pt")
    t = load_pt_tensor(DatasetDir(d), "ok.pt", mmap=True, array="ok")
    assert torch.equal(t, torch.arange(12).reshape(3, 4))
