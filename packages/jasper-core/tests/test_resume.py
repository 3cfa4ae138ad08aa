"""Checkpoint and resume mid-epoch: a loader's ``state_dict()`` restored in a FRESH process serves
exactly the batches an uninterrupted run serves next, bit for bit -- for the CPU loader with
threads, with worker processes and with none, for the GPULoader's logic (on the CPU device), and
under DDP (two real gloo processes, each restoring its own rank's state)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jasper.dataset import BATCH_KEYS, JASPERSteeringDataset
from jasper.gpu_loader import GPULoader
from jasper.loader import create_loader, set_epoch

EPOCH = 5
STOP_AFTER = 3  # batches served before the checkpoint

#: name -> (split, create_loader kwargs, forced variant before the checkpoint)
CONFIGS: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "threads": ("train", {"num_workers": 2, "worker_type": "thread"}, None),
    "processes": ("train", {"num_workers": 2, "worker_type": "process"}, None),
    "no-workers-forced": ("train", {"num_workers": 0}, "keyword"),
    "mapped-unshuffled": ("val", {"num_workers": 2, "use_mmap": True}, None),
    "gpu-loader": ("train", {"gpu_loader": True}, None),
    "gpu-loader-staged": ("train", {"gpu_loader": True, "staged": True}, None),
}


def _make(path: str, split: str, kw: dict[str, Any], **extra: Any) -> Any:
    kw = dict(kw)
    if kw.pop("gpu_loader", False):
        staged = kw.pop("staged", False)
        # the GPU loader's code path on the CPU device: the same order, draw and skip logic
        return GPULoader(JASPERSteeringDataset(path, split), 16, shuffle=split == "train",
                         drop_last=False, staged=staged, reuse_buffers=False, **extra)
    return create_loader(path, split, batch_size=16, **kw, **extra)


def _clone(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k].clone() for k in BATCH_KEYS}


def _rest_of_run(loader: Any) -> list[dict[str, torch.Tensor]]:
    """What a restored loader serves: the rest of the pass, then epoch EPOCH + 1 in full."""
    got = [_clone(b) for b in loader]
    set_epoch(loader, EPOCH + 1)
    got += [_clone(b) for b in loader]
    return got


def _restore_main(path: str, states: str, out: str) -> None:
    """A fresh process: build each loader anew, load its checkpoint, serve the rest."""
    saved = torch.load(states, weights_only=True)
    results = {}
    for name, (split, kw, _) in CONFIGS.items():
        loader = _make(path, split, kw)
        loader.load_state_dict(saved[name])
        results[name] = _rest_of_run(loader)
    torch.save(results, out)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from jasper.store import write_store
    from jasper.testing.data import make_arrays

    arrays, manifest = make_arrays(n_pairs=600, embedding_dim=8, n_neg=3, seed=11)
    return write_store(tmp_path_factory.mktemp("resume") / "ds", arrays, manifest, backend="pt")


def _assert_same(got: list[dict[str, torch.Tensor]], want: list[dict[str, torch.Tensor]],
                 what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} batches, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        for k in BATCH_KEYS:
            assert g[k].dtype == w[k].dtype and torch.equal(g[k], w[k]), f"{what}: batch {i} {k}"


def test_restored_loaders_continue_bit_for_bit_in_a_fresh_process(dataset: Path,
                                                                   tmp_path: Path) -> None:
    expected: dict[str, list[dict[str, torch.Tensor]]] = {}
    states: dict[str, Any] = {}
    for name, (split, kw, forced) in CONFIGS.items():
        # the uninterrupted run: a full pass of EPOCH, a second pass (no set_epoch: a new
        # shuffle), then EPOCH + 1
        ref = _make(str(dataset), split, kw)
        set_epoch(ref, EPOCH)
        if forced:
            ref.dataset_obj.force_steering(forced)
        list(ref)
        second = [_clone(b) for b in ref]
        assert len(second) > STOP_AFTER + 1
        expected[name] = second[STOP_AFTER:] + (set_epoch(ref, EPOCH + 1) or [
            _clone(b) for b in ref])
        # the interrupted run: the same, stopped after STOP_AFTER batches of the second pass
        run = _make(str(dataset), split, kw)
        set_epoch(run, EPOCH)
        if forced:
            run.dataset_obj.force_steering(forced)
        list(run)
        it = iter(run)
        for i, batch in enumerate(it):
            _assert_same([_clone(batch)], [second[i]], f"{name} before the checkpoint")
            if i + 1 == STOP_AFTER:
                break
        states[name] = run.state_dict()
        assert states[name]["batches_yielded"] == STOP_AFTER
        del it
    torch.save(states, tmp_path / "states.pt")  # plain tensors and numbers: weights_only loads
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_restore_main,
                       args=(str(dataset), str(tmp_path / "states.pt"), str(tmp_path / "out.pt")))
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode == 0
    restored = torch.load(tmp_path / "out.pt")
    for name in CONFIGS:
        _assert_same(restored[name], expected[name], name)


def test_state_between_passes_restarts_the_next_pass(dataset: Path) -> None:
    a = create_loader(dataset, "train", batch_size=32, num_workers=2)
    list(a)  # a whole pass: the state points at the start of the next one
    state = a.state_dict()
    assert state["batches_yielded"] == 0 and state["pass"] == 1
    b = create_loader(dataset, "train", batch_size=32, num_workers=2)
    b.load_state_dict(state)
    _assert_same([_clone(x) for x in b], [_clone(x) for x in a], "next pass")


def test_a_state_of_a_differently_built_loader_is_refused(dataset: Path) -> None:
    state = create_loader(dataset, "train", batch_size=16).state_dict()
    with pytest.raises(ValueError, match="batch_size=16 but this loader has batch_size=8"):
        create_loader(dataset, "train", batch_size=8).load_state_dict(state)
    ddp = create_loader(dataset, "train", batch_size=16, distributed=True, num_replicas=2, rank=1)
    with pytest.raises(ValueError, match="same world size"):
        ddp.load_state_dict(state)
    with pytest.raises(ValueError, match="not a jasper loader state"):
        ddp.load_state_dict({"epoch": 3})
    gpu = GPULoader(JASPERSteeringDataset(dataset, "train"), 16, drop_last=True)
    with pytest.raises(ValueError, match="shuffle='epoch' but this loader has shuffle='device'"):
        gpu.load_state_dict(state)


# --- DDP --------------------------------------------------------------------------------------
WORLD = 2
DDP_KINDS = ("threads", "processes", "gpu-loader")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_loader(path: str, kind: str) -> Any:
    if kind == "gpu-loader":
        return GPULoader(JASPERSteeringDataset(path, "train"), 8, shuffle=True,
                         distributed=True, reuse_buffers=False)
    workers = {"threads": (2, "thread"), "processes": (1, "process")}[kind]
    return create_loader(path, "train", batch_size=8, distributed=True,
                         num_workers=workers[0], worker_type=workers[1])  # type: ignore[arg-type]


def _ddp_main(rank: int, port: int, path: str, out: str, phase: str) -> None:
    # mp.spawn leaves spawn as each rank's default start method; the ranks torchrun starts
    # keep the platform's (fork on Linux), which is what a rank's worker processes meet. (Resume
    # with spawned workers: the fresh-process test above. Spawning them here cost ~2 s a pass.)
    import multiprocessing

    multiprocessing.set_start_method("fork", force=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        results: dict[str, Any] = {}
        for kind in DDP_KINDS:
            if phase == "run":
                ref = _ddp_loader(path, kind)
                set_epoch(ref, EPOCH)
                full = [_clone(b) for b in ref]
                results[f"{kind}/expected"] = full[STOP_AFTER:] + (
                    set_epoch(ref, EPOCH + 1) or [_clone(b) for b in ref])
                run = _ddp_loader(path, kind)
                set_epoch(run, EPOCH)
                for i, _ in enumerate(run):
                    if i + 1 == STOP_AFTER:
                        break
                results[f"{kind}/state"] = run.state_dict()
            else:
                saved = torch.load(Path(out) / f"run{rank}.pt")
                loader = _ddp_loader(path, kind)
                loader.load_state_dict(saved[f"{kind}/state"])
                results[f"{kind}/restored"] = _rest_of_run(loader)
        torch.save(results, Path(out) / f"{phase}{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_each_rank_restores_its_own_state_under_ddp(dataset: Path, tmp_path: Path) -> None:
    for phase in ("run", "restore"):  # the restore runs in new processes of a new group
        mp.spawn(_ddp_main, args=(_free_port(), str(dataset), str(tmp_path), phase),
                 nprocs=WORLD, join=True)
    for rank in range(WORLD):
        run = torch.load(tmp_path / f"run{rank}.pt")
        restored = torch.load(tmp_path / f"restore{rank}.pt")
        for kind in DDP_KINDS:
            assert run[f"{kind}/state"]["rank"] == rank
            _assert_same(restored[f"{kind}/restored"], run[f"{kind}/expected"],
                         f"rank {rank} {kind}")
    # the ranks served different samples (the shards really are per rank)
    a = torch.load(tmp_path / "run0.pt")["threads/expected"][0]["question_emb"]
    b = torch.load(tmp_path / "run1.pt")["threads/expected"][0]["question_emb"]
    assert not torch.equal(a, b)
