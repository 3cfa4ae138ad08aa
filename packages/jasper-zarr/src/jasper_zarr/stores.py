"""Where the bytes go: zarr stores and object-store clients for a location, one per process.

- A local directory is a ``zarr.storage.LocalStore``.
- ``s3://bucket/prefix`` is an obstore ``S3Store`` (Rust ``object_store``, async, many requests
  in flight) wrapped in ``zarr.storage.ObjectStore``. Configuration comes from the standard AWS
  environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_REGION``, ``AWS_ALLOW_HTTP``...) unless ``storage_options`` override them.

Clients are created lazily and remembered per process id: obstore's tokio runtime does not
survive a fork (a forked child that uses the parent's client hangs), so a child process always
builds its own. Pickled readers carry the location, never a client.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from jasper.location import Location

#: storage_options keys that are HTTP client settings in obstore (the rest are S3 settings).
_CLIENT_KEYS = frozenset({
    "allow_http", "allow_invalid_certificates", "connect_timeout", "timeout",
    "pool_idle_timeout", "pool_max_idle_per_host", "http1_only", "http2_only", "proxy_url",
    "user_agent", "default_content_type",
})

_lock = threading.Lock()
_clients: dict[tuple[int, str, str], Any] = {}


def _options_key(options: Mapping[str, Any]) -> str:
    return repr(sorted((str(k), repr(v)) for k, v in options.items()))


def s3_client(location: Location) -> Any:
    """This process's obstore ``S3Store`` rooted at ``location`` (cached per pid and options)."""
    key = (os.getpid(), location.path, _options_key(location.storage_options))
    client = _clients.get(key)
    if client is not None:
        return client
    from obstore.store import S3Store

    config: dict[str, Any] = {}
    client_options: dict[str, Any] = {}
    for k, v in location.storage_options.items():
        if k == "client_options" and isinstance(v, Mapping):
            client_options.update(v)
        elif k.lower() in _CLIENT_KEYS:
            client_options[k.lower()] = v
        else:
            config[k] = v
    if "allow_http" not in client_options and _truthy(os.environ.get("AWS_ALLOW_HTTP")):
        client_options["allow_http"] = True
    if "endpoint" not in config and "endpoint_url" not in config:
        # object_store reads AWS_ENDPOINT; AWS_ENDPOINT_URL is what the AWS CLI and SDKs use
        env = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if env:
            config["endpoint"] = env
    if config.get("endpoint_url"):
        config["endpoint"] = config.pop("endpoint_url")
    prefix = location.key or None
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = S3Store(location.bucket, prefix=prefix, config=config or None,
                             client_options=client_options or None)
            # a forked child inherits the dict: drop entries of other processes
            for k in [k for k in _clients if k[0] != key[0]]:
                del _clients[k]
            _clients[key] = client
    return client


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def zarr_store(where: Any, *, read_only: bool) -> Any:
    """The zarr store of a local directory (``Path``) or an object-store :class:`Location`."""
    import zarr.storage

    if isinstance(where, Location) and not where.is_local:
        if where.scheme != "s3":
            raise ValueError(f"jasper-zarr reads s3:// object stores, not {where.scheme}://")
        return zarr.storage.ObjectStore(s3_client(where), read_only=read_only)
    path = where.local_path if isinstance(where, Location) else where
    return zarr.storage.LocalStore(path, read_only=read_only)


class S3Objects:
    """:class:`jasper.location.ObjectStore` over obstore: the byte operations of core's
    generation commit (pointer, manifest, listing and deleting generations)."""

    def __init__(self, location: Location) -> None:
        self.location = location

    def _client(self) -> Any:
        return s3_client(self.location)

    def get(self, key: str) -> bytes:
        import obstore

        return bytes(obstore.get(self._client(), key).bytes())

    def put(self, key: str, data: bytes) -> None:
        import obstore

        obstore.put(self._client(), key, data)

    def list(self, prefix: str = "") -> Iterator[str]:
        for meta in self._list(prefix):
            yield str(meta["path"])

    def size(self, key: str) -> int:
        import obstore

        return int(obstore.head(self._client(), key)["size"])

    def total_size(self, prefix: str = "") -> int:
        return sum(int(m["size"]) for m in self._list(prefix))

    def _list(self, prefix: str) -> Iterator[Mapping[str, Any]]:
        import obstore

        for batch in obstore.list(self._client(), prefix or None):
            yield from batch

    def delete(self, keys: Iterable[str]) -> None:
        import obstore

        batch = list(keys)
        for i in range(0, len(batch), 1000):  # S3 DeleteObjects takes 1000 keys per request
            obstore.delete(self._client(), batch[i : i + 1000])

    def __getstate__(self) -> dict[str, Any]:
        return {"location": self.location}
