"""The demo (the main job) on a tiny configuration, through its function and its CLI entry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jasper.demo import TIER_WEIGHTS, info_nce_loss, main, run_demo
from jasper.registry import get_backend, list_backends


def test_demo_trains_from_every_installed_backend(tmp_path: Path) -> None:
    report = run_demo(tmp_path / "out", n_pairs=400, epochs=3, embedding_dim=16, n_neg=4,
                      batch_size=32, device="cpu")
    writable = [n for n in list_backends() if get_backend(n).capabilities.write]
    assert [r.backend for r in report.runs] == writable
    for run in report.runs:
        assert run.error is None, run.error
        assert len(run.losses) == 3 and run.loss_went_down, run.losses
        assert run.open_seconds > 0 and run.samples_per_second > 0
        assert run.serving_samples_per_second > 0 and run.disk_bytes > 0
        # jasper's own tensors: a preloaded dataset holds at least its embedding tables
        assert run.mode == "preload" and run.dataset_memory_bytes >= 400 * 16 * 4
        assert (tmp_path / "out" / run.backend / "config.json").is_file()
    # every backend served the same data: identical training, identical losses
    assert len({tuple(r.losses) for r in report.runs}) == 1
    # the curriculum moved: no residual steering at epoch 0, no zero steering at the end
    mix = report.runs[0].variant_mix
    assert mix[0][3] == 0.0 and mix[-1][0] == 0.0
    assert report.ok
    text = str(report)
    for run in report.runs:
        assert run.backend in text
    assert "loss per epoch" in text and "train samples/s" in text and "serve samples/s" in text
    assert "jasper MiB" in text and "not torch" in text
    if len(report.runs) > 1:
        assert report.losses_identical and "bit-identical batches" in text
    assert text.splitlines()[-1].startswith("next: ")


def test_demo_reports_a_failing_backend_and_continues(tmp_path: Path) -> None:
    report = run_demo(None, n_pairs=200, epochs=2, embedding_dim=8, n_neg=2, batch_size=32,
                      backends=["no-such-backend", "pt"], device="cpu")
    assert report.runs[0].error is not None and "no-such-backend" in report.runs[0].error
    assert report.runs[1].error is None
    assert not report.ok
    assert "FAILED" in str(report)


def test_main_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--pairs", "200", "--epochs", "2", "--dim", "8", "--n-neg", "2",
                 "--batch-size", "32", "--backends", "pt", "--device", "cpu", "--quiet"])
    out = capsys.readouterr().out
    assert "pt" in out and "loss per epoch" in out
    assert code in (0, 1)  # 1 only if the loss did not go down on this tiny run
    with pytest.raises(SystemExit):
        main(["--pairs", "1"])


def test_info_nce_prefers_the_target_and_weighs_hard_tiers() -> None:
    torch.manual_seed(0)
    target = torch.randn(16, 8)
    negs = torch.randn(16, 4, 8)
    tiers = torch.full((16, 4), 4)
    good = info_nce_loss(target, target, negs, tiers)
    bad = info_nce_loss(-target, target, negs, tiers)
    assert float(good) < float(bad)
    hard = info_nce_loss(torch.randn(16, 8), target, negs, torch.full((16, 4), 1))
    torch.manual_seed(0)
    assert TIER_WEIGHTS[1] > TIER_WEIGHTS[4]
    same_pred = torch.randn(16, 8)
    assert float(info_nce_loss(same_pred, target, negs, torch.full((16, 4), 1))) > float(
        info_nce_loss(same_pred, target, negs, torch.full((16, 4), 4)))
    assert torch.isfinite(hard)
