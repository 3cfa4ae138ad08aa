"""jasper-pt never unpickles code: a `.pt` whose pickle would run code is refused with
UnsafeFileError and the code never runs; arbitrary bytes give FormatError, nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jasper
from jasper.errors import FormatError, UnsafeFileError
from jasper.testing import write_seed_dataset


class CreatesCanary:
    """Unpickling this calls ``open(canary, "w")``: a stand-in for any code an attacker picks."""

    def __init__(self, canary: Path) -> None:
        self.canary = str(canary)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.canary, "w"))


class Opaque:
    """A harmless custom class: still refused, since loading it needs unrestricted unpickling."""

    def __init__(self) -> None:
        self.x = 1


@pytest.fixture
def seed(tmp_path: Path) -> Path:
    return write_seed_dataset(tmp_path / "seed", n_pairs=24, embedding_dim=4, seed=2)


@pytest.mark.parametrize("victim", ["question_embs", "pair_keyword_ids", "train_idx"])
@pytest.mark.parametrize("mmap", [False, True])
def test_code_running_pickle_is_refused_and_never_runs(seed: Path, tmp_path: Path, victim: str,
                                                       mmap: bool) -> None:
    canary = tmp_path / "canary"
    payload = {"data": CreatesCanary(canary)} if victim == "train_idx" else CreatesCanary(canary)
    torch.save(payload, seed / f"{victim}.pt")
    name = "pair_keyword_offsets" if victim == "pair_keyword_ids" else victim
    with pytest.raises(UnsafeFileError) as info, jasper.open_store(seed, mmap=mmap) as reader:
        reader.map(name) if mmap else reader.read(name)
    assert f"{victim}.pt" in str(info.value) and "arbitrary code" in str(info.value)
    assert isinstance(info.value, FormatError) and isinstance(info.value, ValueError)
    with pytest.raises(UnsafeFileError):
        jasper.validate(seed)
    assert not canary.exists(), "the pickle's code ran"
    # the payload is live: an unrestricted load would have run it (so the checks above can fail)
    opened = torch.load(seed / f"{victim}.pt", weights_only=False)
    (opened["data"] if isinstance(opened, dict) else opened).close()
    assert canary.exists()


def test_custom_class_is_refused(seed: Path) -> None:
    torch.save(Opaque(), seed / "pair_relevance.pt")
    with pytest.raises(UnsafeFileError, match="pair_relevance.pt"), \
            jasper.open_store(seed) as reader:
        reader.read("pair_relevance")


def test_a_container_instead_of_a_tensor_is_a_format_error(seed: Path) -> None:
    torch.save({"tensor": torch.zeros(3)}, seed / "pair_relevance.pt")
    with pytest.raises(FormatError, match="expected a tensor"), jasper.open_store(seed) as reader:
        reader.read("pair_relevance")


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.one_of(
    st.binary(max_size=600),
    st.binary(min_size=1, max_size=64).map(lambda b: b"PK\x03\x04" + b),
    st.binary(min_size=1, max_size=64).map(lambda b: b"\x80\x02" + b),
))
def test_arbitrary_bytes_give_format_errors(seed: Path, blob: bytes) -> None:
    (seed / "pair_relevance.pt").write_bytes(blob)
    (seed / "pair_keyword_ids.pt").write_bytes(blob)
    for mmap in (False, True):
        for name in ("pair_relevance", "pair_keyword_offsets"):
            with pytest.raises(FormatError), jasper.open_store(seed, mmap=mmap) as reader:
                reader.read(name)
