"""Object storage: one interface, an S3 implementation (MinIO client) and a local folder.

Keys are built only by the functions in :mod:`imgsift_common.keys` from ids and content
hashes, and every implementation refuses a key that could escape its root.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from imgsift_common.settings import ImgsiftSettings, StorageBackend

_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,511}$")


class ObjectNotFound(KeyError):
    """The key has no object."""


class InvalidKey(ValueError):
    """The key could escape the store or holds characters we never generate."""


def validate_key(key: str) -> str:
    if not _KEY_RE.match(key) or any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidKey(f"invalid object key {key!r}")
    return key


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def list(self, prefix: str) -> Iterator[str]: ...

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        """Upload a file without reading it into memory."""
        ...

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The object's bytes, a chunk at a time."""
        ...


def put_json(store: ObjectStore, key: str, value: Any) -> None:
    store.put(key, json.dumps(value, sort_keys=True, default=str).encode(), "application/json")


def get_json(store: ObjectStore, key: str) -> Any:
    return json.loads(store.get(key))


_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def _temp_file(folder: str) -> tuple[str, int]:
    """A new, empty temp file in ``folder`` (mode 0600, as ``tempfile.mkstemp`` makes): its path and fd."""
    for _ in range(100):
        tmp = os.path.join(folder, f".tmp-{random.getrandbits(64):016x}")  # reseeded in a forked child
        try:
            return tmp, os.open(tmp, _TEMP_FLAGS, 0o600)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp file name in {folder}")


class LocalStore:
    """Objects as files under ``root``; writes are atomic (temp file, then rename).

    A key's folder is checked to resolve inside ``root`` (no link in the store leads out of it)
    and created the first time this store writes to it; later writes to the same folder reuse
    that check, so a write costs one file creation, its write and the rename, not a walk of
    every path component (the crawler writes two objects per image).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._folders: dict[str, str] = {}  # a key's folder part -> its checked, existing folder

    def path(self, key: str) -> Path:
        path = (self.root / validate_key(key)).resolve()
        if self.root not in path.parents:
            raise InvalidKey(f"key {key!r} escapes the store")
        return path

    def _folder(self, key: str) -> tuple[str, str]:
        """The checked folder a key's object goes in (created if need be), and its file name."""
        folder_key, _, name = validate_key(key).rpartition("/")
        folder = self._folders.get(folder_key)
        if folder is None:
            path = self.path(key).parent  # resolved: refused if a link leads out of the store
            path.mkdir(parents=True, exist_ok=True)
            folder = self._folders[folder_key] = str(path)
        return folder, name

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        folder, name = self._folder(key)
        try:
            tmp, fd = _temp_file(folder)
        except FileNotFoundError:  # the folder was removed since it was checked: check and create it again
            self._folders.pop(key.rpartition("/")[0], None)
            folder, name = self._folder(key)
            tmp, fd = _temp_file(folder)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(tmp, os.path.join(folder, name))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        try:
            handle = self.path(key).open("rb")
        except FileNotFoundError:
            raise ObjectNotFound(key) from None
        with handle:
            while chunk := handle.read(chunk_size):
                yield chunk

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> Iterator[str]:
        base = self.root / prefix
        start = base if base.is_dir() else base.parent
        if not start.is_dir():
            return
        for path in sorted(start.rglob("*")):
            if path.is_file() and not path.name.startswith(".tmp-"):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield key


class S3Store:
    """Objects in an S3 bucket through the ``minio`` client (MinIO, AWS S3, moto...)."""

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        *,
        secure: bool = False,
        region: str | None = None,
        timeout: float = 20.0,
    ) -> None:
        import certifi
        import urllib3
        from minio import Minio

        self.bucket = bucket
        # minio's own client, but with a bounded wait: its default (5 minutes to connect and per
        # read) would hold a task that long on an unreachable store instead of letting it retry.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
            maxsize=10,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=urllib3.Retry(total=5, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        )
        self.client = Minio(
            endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region, http_client=http
        )

    def ensure_bucket(self) -> None:
        from minio.error import S3Error

        try:
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)
        except S3Error as exc:  # another worker created it between the two calls
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.client.put_object(
            self.bucket, validate_key(key), io.BytesIO(data), length=len(data), content_type=content_type
        )

    def get(self, key: str) -> bytes:
        from minio.error import S3Error

        try:
            response = self.client.get_object(self.bucket, validate_key(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise ObjectNotFound(key) from None
            raise
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def exists(self, key: str) -> bool:
        from minio.error import S3Error

        try:
            self.client.stat_object(self.bucket, validate_key(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, validate_key(key))

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        # fput_object uploads in parts: a large export never sits in memory.
        self.client.fput_object(self.bucket, validate_key(key), str(path), content_type=content_type)

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        from minio.error import S3Error

        try:
            response = self.client.get_object(self.bucket, validate_key(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise ObjectNotFound(key) from None
            raise
        try:
            yield from response.stream(chunk_size)
        finally:
            response.close()
            response.release_conn()

    def list(self, prefix: str) -> Iterator[str]:
        for obj in self.client.list_objects(self.bucket, prefix=prefix, recursive=True):
            if obj.object_name is not None:
                yield obj.object_name


def store_from_settings(settings: ImgsiftSettings) -> ObjectStore:
    """The object store the settings describe; creates the bucket if it is missing."""
    if settings.storage is StorageBackend.LOCAL:
        return LocalStore(settings.local_storage_dir)
    assert settings.s3_access_key is not None and settings.s3_secret_key is not None  # settings validated
    store = S3Store(
        settings.s3_endpoint,
        settings.s3_access_key.get_secret_value(),
        settings.s3_secret_key.get_secret_value(),
        settings.s3_bucket,
        secure=settings.s3_secure,
        region=settings.s3_region,
        timeout=settings.s3_timeout,
    )
    store.ensure_bucket()
    return store
