"""Data safety of writes: overwrite replaces only datasets, the swap never loses the old dataset,
two writers to one target cannot silently replace each other, killed writers' scratch is removed.

Every crash and race here runs in real child processes (SIGKILL, two concurrent writers).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import jasper
from jasper import atomic
from jasper.errors import DatasetExistsError, OverwriteRefusedError
from jasper.manifest import Manifest
from jasper.store import open_store, write_store
from jasper.synth import SynthConfig, synthesize, write_synthetic
from jasper.testing.conformance import child_env

SWAP_MODES = [pytest.param({}, id="renameat2"), pytest.param({"JASPER_NO_RENAMEAT2": "1"},
                                                             id="two-renames")]


def tiny(seed: int = 3) -> tuple[dict[str, torch.Tensor], Manifest]:
    sources, manifest = synthesize(SynthConfig(n_pairs=120, embedding_dim=8, n_neg=2,
                                               n_clusters=2, seed=seed))
    return {n: s.materialize().clone() for n, s in sources.items()}, manifest


def user_files(d: Path) -> Path:
    """A directory of files that are not a dataset."""
    d.mkdir(parents=True)
    (d / "thesis.tex").write_text("years of work")
    (d / "sub").mkdir()
    (d / "sub" / "data.csv").write_text("1,2,3")
    return d


def tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".jasper-" in p.name)


# --- 1. overwrite replaces only a jasper dataset ---------------------------------------------
def test_write_store_overwrite_refuses_user_files(tmp_path: Path) -> None:
    target = user_files(tmp_path / "mine")
    before = tree(target)
    arrays, manifest = tiny()
    with pytest.raises(OverwriteRefusedError, match="not a dataset"):
        write_store(target, arrays, manifest, backend="pt", overwrite=True)
    assert tree(target) == before
    assert leftovers(tmp_path) == []


def test_synth_overwrite_refuses_user_files_before_synthesising(tmp_path: Path) -> None:
    target = user_files(tmp_path / "mine")
    before = tree(target)
    with pytest.raises(OverwriteRefusedError):
        write_synthetic(target, SynthConfig(n_pairs=50, embedding_dim=4, n_neg=2, n_clusters=2),
                        overwrite=True)
    assert tree(target) == before
    assert leftovers(tmp_path) == []


def test_atomic_directory_overwrite_refuses_user_files(tmp_path: Path) -> None:
    target = user_files(tmp_path / "mine")
    before = tree(target)
    with pytest.raises(OverwriteRefusedError), atomic.atomic_directory(target, overwrite=True) as t:
        (t / "config.json").write_text("{}")
    assert tree(target) == before


def test_convert_into_the_parent_of_its_source_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "projects"
    src = parent / "ds"
    arrays, manifest = tiny()
    write_store(src, arrays, manifest, backend="pt")
    (parent / "sibling.txt").write_text("keep me")
    # even a parent that itself looks like a dataset is never replaced by its own content
    (parent / "config.json").write_text('{"embedding_dim": 8, "n_neg": 2}')
    before = tree(parent)
    with pytest.raises(OverwriteRefusedError, match="contains the source"):
        jasper.convert(src, parent, to="pt", overwrite=True)
    with pytest.raises(OverwriteRefusedError, match="is the source"):
        jasper.convert(src, src, to="pt", overwrite=True)
    with pytest.raises(OverwriteRefusedError, match="lies inside the source"):
        jasper.convert(src, src / "inner", to="pt")
    assert tree(parent) == before
    assert leftovers(parent) == [] and leftovers(src) == []


def test_overwrite_never_follows_a_symlink(tmp_path: Path) -> None:
    arrays, manifest = tiny()
    real = write_store(tmp_path / "elsewhere" / "ds", arrays, manifest, backend="pt")
    before = tree(real)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(OverwriteRefusedError, match="symlink"):
        write_store(link, arrays, manifest, backend="pt", overwrite=True)
    assert link.is_symlink() and tree(real) == before
    # a manifest that is itself a symlink does not make a directory a dataset
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "config.json").symlink_to(real / "config.json")
    with pytest.raises(OverwriteRefusedError, match="not a dataset"):
        write_store(fake, arrays, manifest, backend="pt", overwrite=True)


def test_overwrite_of_a_dataset_still_works(tmp_path: Path) -> None:
    arrays, manifest = tiny()
    out = write_store(tmp_path / "ds", arrays, manifest, backend="pt")
    arrays["pair_relevance"] = arrays["pair_relevance"] * 0.5
    write_store(out, arrays, manifest, backend="pt", overwrite=True)
    with open_store(out) as r:
        assert torch.equal(r.read("pair_relevance"), arrays["pair_relevance"])
    assert leftovers(tmp_path) == []
    with pytest.raises(DatasetExistsError):
        write_store(out, arrays, manifest, backend="pt")


# --- 2. the swap never loses the old dataset -------------------------------------------------
def test_renameat2_is_used_on_linux() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux-only")
    assert atomic._renameat2_fn is not None


@pytest.mark.parametrize("env", SWAP_MODES)
def test_overwrite_in_both_swap_modes(tmp_path: Path, env: dict[str, str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    arrays, manifest = tiny()
    out = write_store(tmp_path / "ds", arrays, manifest, backend="pt")
    manifest.dataset_name = "second"
    write_store(out, arrays, manifest, backend="pt", overwrite=True)
    assert Manifest.load(out).dataset_name == "second"
    assert leftovers(tmp_path) == []



# --- an old version a reader holds ----------------------------------------------------------
@pytest.mark.parametrize("env", SWAP_MODES)
def test_a_held_old_version_outlives_its_replacement_until_its_reader_closes(
        tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader that opens files by name after opening (Chroma) holds its version: the commit
    that replaces it keeps every file of it, and the first write after the reader closed removes
    it. Without the hold the old files are deleted at the commit."""
    from jasper.files import DatasetDir

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    arrays, manifest = tiny()
    manifest.dataset_name = "old"
    target = write_store(tmp_path / "ds", arrays, manifest, backend="pt")
    old = tree(target)
    reader = DatasetDir(target)
    assert reader.hold()
    by_name = Path(f"/proc/self/fd/{reader.fd}")
    manifest.dataset_name = "new"
    write_store(target, arrays, manifest, backend="pt", overwrite=True)
    assert Manifest.load(target).dataset_name == "new"
    assert tree(by_name) == old  # still readable by name through the reader's descriptor
    held = [n for n in leftovers(tmp_path) if atomic.HELD_MARK in n]
    assert len(held) == 1 and tree(tmp_path / held[0]) == old
    assert atomic.clean_leftovers(target) == []  # still held
    # a held version is no interrupted swap: it never comes back as the dataset
    os.rename(target, tmp_path / "moved-away")
    assert atomic.recover_interrupted_commit(target) is None
    os.rename(tmp_path / "moved-away", target)
    reader.close()
    write_store(target, arrays, manifest, backend="pt", overwrite=True)
    assert leftovers(tmp_path) == []


def test_a_version_being_deleted_cannot_be_held(tmp_path: Path) -> None:
    """The commit deletes under an exclusive lock: a reader that opened the old directory just
    before the swap is told to open the path again instead of pinning half-deleted files."""
    import fcntl

    from jasper.files import DatasetDir

    arrays, manifest = tiny()
    target = write_store(tmp_path / "ds", arrays, manifest, backend="pt")
    deleting = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(deleting, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert not DatasetDir(target).hold()
        assert not atomic.remove_unless_held(target) and target.exists()
    finally:
        os.close(deleting)
    assert atomic.remove_unless_held(target) and not target.exists()

_CRASH_BETWEEN_RENAMES = textwrap.dedent("""
    import os, signal, sys
    from jasper import atomic
    from jasper.store import write_store
    from jasper.synth import SynthConfig, synthesize
    src, m = synthesize(SynthConfig(n_pairs=120, embedding_dim=8, n_neg=2, n_clusters=2, seed=9))
    m.dataset_name = "new"
    atomic._between_renames = lambda: os.kill(os.getpid(), signal.SIGKILL)
    write_store(sys.argv[1], src, m, backend="pt", overwrite=True)
""")


def _crash_between_renames(target: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _CRASH_BETWEEN_RENAMES, str(target)],
                          env=child_env(JASPER_NO_RENAMEAT2="1"), capture_output=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


def test_crash_between_the_two_renames_is_recovered_on_open(tmp_path: Path) -> None:
    arrays, manifest = tiny()
    manifest.dataset_name = "old"
    target = write_store(tmp_path / "ds", arrays, manifest, backend="pt")
    old = tree(target)
    _crash_between_renames(target)
    assert not target.exists()  # the window the fallback cannot close...
    assert any(atomic.TRASH_MARK in n for n in leftovers(tmp_path))
    with open_store(target) as r:  # ...and the next open closes it
        assert r.manifest.dataset_name == "old"
    assert tree(target) == old


def test_crash_between_the_two_renames_is_recovered_by_the_next_write(tmp_path: Path) -> None:
    arrays, manifest = tiny()
    manifest.dataset_name = "old"
    target = write_store(tmp_path / "ds", arrays, manifest, backend="pt")
    old = tree(target)
    _crash_between_renames(target)
    # the next write must not delete the only complete copy as a dead writer's leftovers
    with pytest.raises(DatasetExistsError):
        write_store(target, arrays, manifest, backend="pt")
    assert tree(target) == old
    assert leftovers(tmp_path) == []


# --- 3. two writers to one target ------------------------------------------------------------
_GATED_WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from jasper.backend import ArraySource
    from jasper.errors import ConcurrentWriteError
    from jasper.store import write_store
    from jasper.synth import SynthConfig, synthesize
    target, flags, me, other, overwrite = sys.argv[1:6]
    src, m = synthesize(SynthConfig(n_pairs=120, embedding_dim=8, n_neg=2, n_clusters=2))
    m.dataset_name = me

    class Gate(ArraySource):
        # both writers pass their start-of-write checks before either commits
        def __init__(self, inner):
            self.inner, self.shape, self.dtype = inner, inner.shape, inner.dtype
        def iter_chunks(self, n):
            Path(flags, me).touch()
            deadline = time.monotonic() + 60
            while not Path(flags, other).exists():
                assert time.monotonic() < deadline, "the other writer never started"
                time.sleep(0.01)
            yield from self.inner.iter_chunks(n)

    src["steering_residual"] = Gate(src["steering_residual"])
    try:
        write_store(target, src, m, backend="pt", overwrite=overwrite == "1")
    except ConcurrentWriteError as exc:
        print(exc)
        sys.exit(3)
""")


@pytest.mark.parametrize("env", SWAP_MODES)
@pytest.mark.parametrize("overwrite", [False, True], ids=["new-target", "overwrite"])
def test_two_writers_one_wins_the_other_gets_a_typed_error(
    tmp_path: Path, env: dict[str, str], overwrite: bool
) -> None:
    target = tmp_path / "out" / "ds"
    flags = tmp_path / "flags"
    flags.mkdir()
    if overwrite:
        arrays, manifest = tiny()
        manifest.dataset_name = "original"
        write_store(target, arrays, manifest, backend="pt")
    procs = {
        me: subprocess.Popen(
            [sys.executable, "-c", _GATED_WRITER, str(target), str(flags), me, other,
             "1" if overwrite else "0"],
            env=child_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for me, other in (("a", "b"), ("b", "a"))
    }
    results = {me: (p.wait(timeout=120), p.communicate()) for me, p in procs.items()}
    codes = sorted(rc for rc, _ in results.values())
    assert codes == [0, 3], {k: (rc, err.decode()[-1500:]) for k, (rc, (_, err)) in results.items()}
    winner = next(me for me, (rc, _) in results.items() if rc == 0)
    loser_out = results["b" if winner == "a" else "a"][1][0].decode()
    assert "another writer" in loser_out
    assert Manifest.load(target).dataset_name == winner
    jasper.validate(target, deep=True)
    assert leftovers(target.parent) == []


# --- 4. a killed synth's scratch is removed by the next write ---------------------------------
def test_killed_synth_scratch_is_removed_by_the_next_write(tmp_path: Path) -> None:
    target = tmp_path / "ds"
    # memory_limit=0 sends every pair array to memory-mapped scratch files
    script = textwrap.dedent("""
        import sys
        from jasper import synth
        from jasper.synth import SynthConfig, write_synthetic
        real = synth.synthesize
        def slow(cfg, workdir=None, memory_limit=0, progress=None):
            out = real(cfg, workdir=workdir, memory_limit=0, progress=progress)
            print("scratch-filled", flush=True)
            import time; time.sleep(120)
            return out
        synth.synthesize = slow
        write_synthetic(sys.argv[1], SynthConfig(n_pairs=2000, embedding_dim=16, n_neg=2,
                                                 n_clusters=2))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(target)], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert "scratch-filled" in line, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    left = leftovers(tmp_path)
    assert left and all(atomic.SCRATCH_MARK in n for n in left)
    scratch = tmp_path / left[0]
    assert any(scratch.iterdir()), "the scratch should hold the memory-mapped pair arrays"
    write_synthetic(target, SynthConfig(n_pairs=50, embedding_dim=4, n_neg=2, n_clusters=2))
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_clean_leftovers_keeps_a_live_writers_directories(tmp_path: Path) -> None:
    target = tmp_path / "ds"
    mine = atomic.leftover_name(target, atomic.TMP_MARK)
    mine.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = tmp_path / f".ds{atomic.SCRATCH_MARK}{sleeper.pid}-abc"
        theirs.mkdir()
        assert atomic.clean_leftovers(target) == []
        assert mine.is_dir() and theirs.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert atomic.clean_leftovers(target) == [theirs]
    os.rmdir(mine)
    time.sleep(0)


def test_free_space_guard_counts_each_part_and_what_the_writer_may_still_hold(
        tmp_path: Path) -> None:
    """FreeSpaceGuard (compressed HDF5 writes): a part is refused with the typed ENOSPC error
    when its raw bytes, plus what earlier parts may still sit in the writer's cache, plus the
    slack, exceed the free space; the cache term is at most what was handed on so far."""
    import errno

    from jasper.errors import StorageError

    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    target = tmp_path / "dataset.h5"
    atomic.FreeSpaceGuard(target, slack=0).require(1, "one byte")
    with pytest.raises(StorageError, match="no space left on the device: writing a block") as e:
        atomic.FreeSpaceGuard(target, slack=free + (1 << 30)).require(1, "a block")
    assert e.value.errno == errno.ENOSPC and str(target) in str(e.value)
    guard = atomic.FreeSpaceGuard(target, slack=0, buffered=4 * free)
    guard.require(free // 2, "the first half")  # nothing held yet: about half the space
    with pytest.raises(StorageError):  # the first half may still be in the cache
        guard.require(free // 2 + free // 8, "the second part")
