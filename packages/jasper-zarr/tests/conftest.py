"""Shared fixtures of jasper-zarr's tests: small synthetic datasets and a real S3 server.

The server (SeaweedFS on 127.0.0.1, moto as the fallback; see s3server.py) is started once per
test session, only when a test asks for it, and the standard AWS variables point every client
(obstore in this process and in spawned children) at it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import torch

from jasper.manifest import Manifest
from jasper.testing.data import make_arrays
from jasper_zarr.s3server import S3Server, s3_server

os.environ.setdefault("JASPER_PROGRESS", "0")


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        try:
            yield server
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture
def s3_url(s3: S3Server) -> str:
    """A fresh, empty prefix in the test bucket."""
    return f"s3://{s3.bucket}/t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def small() -> tuple[dict[str, torch.Tensor], Manifest]:
    return make_arrays(n_pairs=300, embedding_dim=24)
