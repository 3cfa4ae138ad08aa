"""The ``jasper`` command line: every command, exit codes, errors without tracebacks."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jasper.cli import main
from jasper.registry import install_hint


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
        assert b["install"] == install_hint(b["package"])
        assert f"./packages/{b['package']} " in b["install"]
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


def test_cluster_labeled_is_written_and_served_with_the_default_writer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """The kind belongs to core: synth writes it with whatever backend is installed, and the
    dataset class serves it, with or without jasper-memmap-sqlite."""
    code, out, err = run(capsys, "synth", str(tmp_path / "cl"), "--kind", "cluster-labeled",
                         "--samples", "30", "--dim", "4", "--clusters", "3")
    assert code == 0, err
    assert "wrote cluster-labeled dataset" in out
    from jasper import ClusterLabeledDataset

    with ClusterLabeledDataset(tmp_path / "cl") as ds:
        assert (len(ds), ds.embedding_dim, ds.n_clusters) == (30, 4, 3)
    code, out, err = run(capsys, "validate", str(tmp_path / "cl"), "--deep")
    assert code == 0 and "30 samples" in out, err


@pytest.mark.parametrize("argv", [["--pairs", "0"], ["--dim", "0"], ["--neg", "-1"],
                                  ["--pairs", "many"]])
def test_synth_rejects_empty_sizes_in_one_line(tmp_path: Path, argv: list[str],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["synth", str(tmp_path / "ds"), *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jasper synth: error: argument")
    assert not (tmp_path / "ds").exists()


def test_every_option_has_help_and_no_empty_defaults() -> None:
    from jasper.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        if name == "demo":
            continue  # the demo has its own parser
        for action in sub._actions:
            assert action.help, f"jasper {name}: {action.dest} has no help"
        text = " ".join(sub.format_help().split())
        assert "(default: None)" not in text, text
        assert not re.search(r"\(default[^)]*\) \(default", text), text


def test_synth_defaults_to_an_installed_writer_and_says_which(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("jasper_hdf5")
    import jasper

    monkeypatch.setenv("JASPER_BACKENDS", "hdf5")  # as if only jasper-hdf5 were installed
    jasper.refresh_backends()
    try:
        code, out, err = run(capsys, "synth", str(tmp_path / "ds"), "--pairs", "60", "--dim", "4",
                             "--neg", "2", "--clusters", "2")
    finally:
        monkeypatch.delenv("JASPER_BACKENDS")
        jasper.refresh_backends()
    assert code == 0, err
    assert "with backend 'hdf5' (the default" in out
    assert (tmp_path / "ds" / "dataset.h5").is_file()


def test_convert_reports_true_sizes_and_the_options_the_target_got(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("jasper_hdf5")
    from jasper.store import dir_size

    src = tmp_path / "gz"
    code, _, err = run(capsys, "synth", str(src), "--pairs", "300", "--dim", "8", "--neg", "2",
                       "--clusters", "2", "--backend", "hdf5", "--compression", "gzip")
    assert code == 0, err
    code, out, err = run(capsys, "convert", str(src), str(tmp_path / "h5"), "--to", "hdf5")
    assert code == 0, err
    assert "compression='gzip' (from the source)" in out
    assert f"{dir_size(src) / (1 << 20):,.1f} MiB" in out.splitlines()[0]
    code, out, err = run(capsys, "convert", str(src), str(tmp_path / "pt"), "--to", "pt")
    assert code == 0, err
    assert "not carried: compression='gzip' (backend 'pt' has no 'compression' option)" in out
    # converting onto the source is refused, the source intact
    before = dir_size(src)
    code, _, err = run(capsys, "convert", str(src), str(src), "--to", "hdf5", "--overwrite")
    assert code == 1 and "is the source" in err and dir_size(src) == before


def test_an_untyped_failure_is_still_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import jasper.cli

    def broken(args: object) -> int:
        raise RuntimeError("something\nunexpected")

    monkeypatch.setattr(jasper.cli, "cmd_info", broken)
    code, _, err = run(capsys, "info", str(tmp_path))
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "RuntimeError: something unexpected" in err


def test_ctrl_c_exits_130_with_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    import os
    import signal
    import time

    from jasper.testing.conformance import child_env, sigint_as_from_a_terminal

    target = tmp_path / "ds"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jasper", "synth", str(target), "--pairs", "400000", "--dim", "64",
         "--no-progress"], env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=sigint_as_from_a_terminal)
    deadline = time.monotonic() + 120
    while not any(".jasper-" in p.name for p in tmp_path.iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the write never started"
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["backends"], ["synth", "--help"],
                                  ["info", "/nonexistent/dataset"]])
def test_commands_that_make_no_tensors_do_not_import_torch(argv: list[str]) -> None:
    from jasper.testing.conformance import child_env

    code = ("import sys\nfrom jasper.cli import main\ntry:\n    rc = main(sys.argv[1:])\n"
            "except SystemExit as e:\n    rc = e.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          timeout=120, env=child_env())
    assert proc.stderr.strip().splitlines()[-1] == "NO-TORCH", proc.stderr[-2000:]
