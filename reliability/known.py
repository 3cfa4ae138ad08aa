"""Case groups that fail the goal today, each with the issue item that fixes it.

The quick test (``tests/test_reliability_quick.py``) marks these groups ``xfail``: strict where
the failure is deterministic, so that the fix landing turns the test red until its entry is
removed here, and non-strict only where the case is a race whose failure shows in some runs.
The goal itself is never relaxed: an entry here is a finding waiting for its fix.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Known:
    """Why a (family, backend) group fails, and which issue item fixes it."""

    item: str
    reason: str
    racy: bool = False


#: (family, backend) -> why it fails now; keep in step with the last campaign run
#: (docs/reliability.md lists its findings)
KNOWN: dict[tuple[str, str], Known] = {
    ("disk-full", "pt"): Known(
        "issue 9 item 13", "a full disk during a .pt write escapes as torch's RuntimeError "
        "(basic_ios::clear / inline_container 'unexpected pos'), not a typed error"),
    ("disk-full", "hdf5"): Known(
        "issue 9 item 13", "a full disk during an HDF5 write escapes as h5py's OSError errno 28 "
        "from FileID.close, not a typed error"),
    ("disk-full", "memmap-sqlite"): Known(
        "issue 9 item 13", "a full disk during a .npy write escapes as OSError ENOSPC "
        "(npy.py _write_all) and sqlite3.OperationalError 'database or disk is full'"),
    ("path-trust", "cluster"): Known(
        "issue 9 item 9", "a cluster-labeled embeddings_meta.file_path that is absolute or ../ "
        "is followed out of the dataset directory by open and deep validation"),
    ("cli", "cli"): Known(
        "issue 9 item 13", "`jasper synth --pairs 0` (and --dim 0, --neg 0) lets SynthConfig's "
        "ValueError escape the CLI as a traceback instead of one line"),
    ("kill", "cluster"): Known(
        "issue 9 item 6", "update_labels killed mid-call leaves label files ahead of their block "
        "checksums (deep validation: ChecksumError)", racy=True),
}
