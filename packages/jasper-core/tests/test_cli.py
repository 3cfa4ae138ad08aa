"""The ``jasper`` command line: every command, exit codes, errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jasper.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_backends_lists_installed_and_installable(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "backends", "--json")
    assert code == 0
    data = json.loads(out)
    names = {b["name"] for b in data["installed"]}
    assert "pt" in names
    pt = next(b for b in data["installed"] if b["name"] == "pt")
    assert pt["distribution"] == "jasper-pt" and pt["capabilities"]["mmap"] is True
    for b in data["installable"]:
        assert b["install"] == f"pip install {b['package']}"
        assert b["name"] not in names
    code, out, _ = run(capsys, "backends")
    assert code == 0 and "Installed backends:" in out and "pt" in out


def test_synth_info_validate_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = tmp_path / "ds"
    code, out, _ = run(capsys, "synth", str(ds), "--pairs", "500", "--dim", "16", "--neg", "3",
                       "--clusters", "4", "--dtype", "bfloat16")
    assert code == 0 and "500 pairs" in out and "bfloat16" in out
    code, out, _ = run(capsys, "info", str(ds), "--json")
    info = json.loads(out)
    assert info["backend"] == "pt" and info["embedding_dim"] == 16
    assert info["arrays"]["steering_residual"] == {"shape": [500, 16], "dtype": "bfloat16",
                                                   "bytes": 500 * 16 * 2}
    assert sum(info["splits"].values()) == 500
    code, out, _ = run(capsys, "info", str(ds))
    assert code == 0 and "steering_residual" in out
    code, out, _ = run(capsys, "validate", str(ds), "--deep")
    assert code == 0 and "deep validation passed for 500 pairs" in out and "18 checksums" in out
    code, out, _ = run(capsys, "convert", str(ds), str(tmp_path / "copy"), "--to", "pt")
    assert code == 0 and "saving:" in out and "source:" in out and "target:" in out
    code, out, _ = run(capsys, "validate", str(tmp_path / "copy"), "--json")
    assert json.loads(out)["ok"] is True


def test_errors_exit_1_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run(capsys, "info", str(tmp_path / "nope"))
    assert code == 1
    assert err.startswith("jasper info: error: Dataset directory not found")
    assert "Traceback" not in err
    ds = tmp_path / "ds"
    run(capsys, "synth", str(ds), "--pairs", "50", "--dim", "4")
    code, _, err = run(capsys, "synth", str(ds), "--pairs", "50", "--dim", "4")
    assert code == 1 and "--overwrite" in err
    code, _, err = run(capsys, "convert", str(ds), str(tmp_path / "x"), "--to", "pt",
                       "--compression", "lzf")
    assert code == 2 and "does not accept option(s) compression" in err
    code, _, err = run(capsys, "convert", str(ds), str(tmp_path / "x"), "--to", "nope")
    assert code == 1 and "unknown storage backend 'nope'" in err


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    from jasper.errors import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError):
        main(["info", str(tmp_path / "nope"), "--debug"])


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["validate"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["synth", "x", "--option", "novalue"])
    assert info.value.code == 2


def test_console_script_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "jasper.cli", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    for command in ("backends", "synth", "info", "validate", "convert", "demo"):
        assert command in proc.stdout


def test_cluster_labeled_without_its_backend_names_the_package(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("jasper.cluster")
    try:
        import jasper_memmap_sqlite  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("jasper-memmap-sqlite is installed; its own tests cover the command")
    code, _, err = run(capsys, "synth", str(tmp_path / "cl"), "--kind", "cluster-labeled")
    assert code == 1 and "pip install jasper-memmap-sqlite" in err
    from jasper.errors import BackendNotFoundError

    with pytest.raises(BackendNotFoundError, match="pip install jasper-memmap-sqlite"):
        from jasper import ClusterLabeledDataset  # noqa: F401
