"""The sync and async clients. Both send the same request plans (``_Requests`` builds each
request and says how its answer is read); only the I/O and the waiting differ."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx

from imgsift_client.errors import ImgsiftError, JobFailed, WaitTimeout, error_for
from imgsift_client.models import Calibration, Crop, Export, Job, Questions

FileLike = str | Path | bytes | tuple[str, bytes]
ProgressCallback = Callable[[Job], object]
T = TypeVar("T")


def _files(field: str, items: Iterable[FileLike]) -> list[tuple[str, tuple[str, bytes, str]]]:
    out = []
    for i, item in enumerate(items):
        if isinstance(item, tuple):
            name, data = item
        elif isinstance(item, bytes):
            name, data = f"{field}-{i}.jpg", item
        else:
            path = Path(item)
            name, data = path.name, path.read_bytes()
        out.append((field, (name, data, "application/octet-stream")))
    return out


def _auth(api_key: str | None) -> dict[str, str]:
    key = api_key or os.environ.get("IMGSIFT_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _check(response: httpx.Response) -> Any:
    if response.is_success:
        return response.json() if response.content else None
    try:
        body = response.json()
    except ValueError:
        body = response.text
    raise error_for(response.status_code, body, response.headers.get("Retry-After"))


def _crop_params(threshold: float | None, accepted: bool | None, page_size: int, cursor: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": page_size}
    if threshold is not None:
        params["threshold"] = threshold
    if accepted is not None:
        params["accepted"] = str(accepted).lower()
    if cursor:
        params["cursor"] = cursor
    return params


def _create_args(
    spec: dict[str, Any], references: Iterable[FileLike], negatives: Iterable[FileLike], idempotency_key: str | None
) -> dict[str, Any]:
    return {
        "data": {"spec": json.dumps(spec)},
        "files": _files("references", references) + _files("negatives", negatives),
        "headers": {"Idempotency-Key": idempotency_key} if idempotency_key else {},
    }


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One API request and how its answer is read: built once, sent by either client."""

    method: str
    path: str
    read: Callable[[Any], T]
    kwargs: dict[str, Any] = field(default_factory=dict)


class _Requests:
    """The requests of the API's simple methods; the clients only send them."""

    @staticmethod
    def create_job(
        spec: dict[str, Any], references: Iterable[FileLike], negatives: Iterable[FileLike], idempotency_key: str | None
    ) -> _Call[Job]:
        return _Call("POST", "/v1/jobs", Job.model_validate, _create_args(spec, references, negatives, idempotency_key))

    @staticmethod
    def get_job(job_id: str) -> _Call[Job]:
        return _Call("GET", f"/v1/jobs/{job_id}", Job.model_validate)

    @staticmethod
    def list_jobs(limit: int) -> _Call[list[Job]]:
        def read(body: Any) -> list[Job]:
            return [Job.model_validate(j) for j in body["items"]]

        return _Call("GET", "/v1/jobs", read, {"params": {"limit": limit}})

    @staticmethod
    def set_threshold(job_id: str, threshold: float) -> _Call[Job]:
        return _Call("PATCH", f"/v1/jobs/{job_id}", Job.model_validate, {"json": {"threshold": threshold}})

    @staticmethod
    def cancel(job_id: str) -> _Call[Job]:
        return _Call("POST", f"/v1/jobs/{job_id}/cancel", Job.model_validate)

    @staticmethod
    def train(job_id: str) -> _Call[Job]:
        return _Call("POST", f"/v1/jobs/{job_id}/train", Job.model_validate)

    @staticmethod
    def mark(job_id: str, crop_id: str, correct: bool | None) -> _Call[Calibration]:
        path = f"/v1/jobs/{job_id}/crops/{crop_id}/feedback"
        return _Call("PUT", path, Calibration.model_validate, {"json": {"correct": correct}})

    @staticmethod
    def questions(job_id: str, limit: int) -> _Call[Questions]:
        return _Call("GET", f"/v1/jobs/{job_id}/questions", Questions.model_validate, {"params": {"limit": limit}})

    @staticmethod
    def crops_page(
        job_id: str, threshold: float | None, accepted: bool | None, page_size: int, cursor: str | None
    ) -> _Call[dict[str, Any]]:
        params = _crop_params(threshold, accepted, page_size, cursor)
        return _Call("GET", f"/v1/jobs/{job_id}/crops", dict, {"params": params})

    @staticmethod
    def start_export(job_id: str, format: str, threshold: float | None, options: dict[str, Any]) -> _Call[Export]:
        body = {"format": format, "threshold": threshold, **{k: v for k, v in options.items() if v is not None}}
        return _Call("POST", f"/v1/jobs/{job_id}/exports", Export.model_validate, {"json": body})

    @staticmethod
    def get_export(job_id: str, export_id: str) -> _Call[Export]:
        return _Call("GET", f"/v1/jobs/{job_id}/exports/{export_id}", Export.model_validate)


def _final(job: Job) -> Job:
    if job.state in ("failed", "cancelled"):
        raise JobFailed(f"job {job.id} ended {job.state}: {job.error or 'no reason given'}", body=job)
    return job


def _check_deadline(deadline: float | None, message: str, body: object) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise WaitTimeout(message, body=body)


def _downloadable(export: Export) -> str:
    if export.state != "done" or not export.download_url:
        raise ImgsiftError(f"export {export.id} {export.state}: {export.error}", body=export)
    return export.download_url


class ImgsiftClient:
    """Blocking client. ``api_key`` (default: the IMGSIFT_API_KEY variable) is sent as ``Authorization: Bearer``."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = _auth(api_key)
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> ImgsiftClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _send(self, call: _Call[T]) -> T:
        try:
            return call.read(_check(self.http.request(call.method, call.path, **call.kwargs)))
        except httpx.TransportError as exc:
            raise ImgsiftError(f"cannot reach the imgsift API: {exc}") from exc

    # ------------------------------------------------------------------ jobs
    def create_job(
        self,
        spec: dict[str, Any],
        references: Iterable[FileLike],
        *,
        negatives: Iterable[FileLike] = (),
        idempotency_key: str | None = None,
    ) -> Job:
        """Create and start a job; ``references`` (and "not this" ``negatives``) are paths, bytes or (name, bytes)."""
        return self._send(_Requests.create_job(spec, references, negatives, idempotency_key))

    def get_job(self, job_id: str) -> Job:
        return self._send(_Requests.get_job(job_id))

    def list_jobs(self, limit: int = 100) -> list[Job]:
        return self._send(_Requests.list_jobs(limit))

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll: float = 1.0,
        on_progress: ProgressCallback | None = None,
    ) -> Job:
        """Poll until the job is final; ``on_progress`` gets each status. Raises JobFailed, WaitTimeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if on_progress:
                on_progress(job)
            if job.is_final:
                return _final(job)
            _check_deadline(deadline, f"job {job_id} still {job.state} after {timeout} s", job)
            time.sleep(poll)

    def set_threshold(self, job_id: str, threshold: float) -> Job:
        return self._send(_Requests.set_threshold(job_id, threshold))

    def cancel(self, job_id: str) -> Job:
        return self._send(_Requests.cancel(job_id))

    def train(self, job_id: str) -> Job:
        return self._send(_Requests.train(job_id))

    def mark(self, job_id: str, crop_id: str, correct: bool | None) -> Calibration:
        """Answer a crop: right (True), wrong (False), or take the answer back (None)."""
        return self._send(_Requests.mark(job_id, crop_id, correct))

    def questions(self, job_id: str, limit: int = 10) -> Questions:
        """The ``limit`` crops whose answers would settle the job's threshold most (answer them with ``mark``)."""
        return self._send(_Requests.questions(job_id, limit))

    # ------------------------------------------------------------------ crops
    def crops(
        self, job_id: str, *, threshold: float | None = None, accepted: bool | None = None, page_size: int = 100
    ) -> Iterator[Crop]:
        """Every crop (or the accepted / rejected ones) by ascending distance, fetched a page at a time."""
        cursor = None
        while True:
            page = self._send(_Requests.crops_page(job_id, threshold, accepted, page_size, cursor))
            yield from (Crop.model_validate(c) for c in page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                return

    # ------------------------------------------------------------------ exports
    def export(
        self,
        job_id: str,
        format: str,
        dest: str | Path,
        *,
        threshold: float | None = None,
        originals: bool | None = None,
        embed_images: bool | None = None,
        samples_per_shard: int | None = None,
        timeout: float = 600.0,
        poll: float = 0.5,
    ) -> Export:
        """Build an export on the server, wait for it, and stream it to ``dest``.

        ``originals`` (webdataset: the original photos as samples), ``embed_images`` (parquet: the
        crops' bytes in a ``jpg`` column) and ``samples_per_shard`` (webdataset, huggingface) are the
        server's export options; None leaves the server's default.
        """
        options = {"originals": originals, "embed_images": embed_images, "samples_per_shard": samples_per_shard}
        export = self._send(_Requests.start_export(job_id, format, threshold, options))
        deadline = time.monotonic() + timeout
        while export.state in ("queued", "running"):
            _check_deadline(deadline, f"export {export.id} still {export.state} after {timeout} s", export)
            time.sleep(poll)
            export = self._send(_Requests.get_export(job_id, export.id))
        download_url = _downloadable(export)
        with self.http.stream("GET", download_url) as response:
            if not response.is_success:
                response.read()
                _check(response)
            with Path(dest).open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
        return export


class AsyncImgsiftClient:
    """The same client for asyncio: every method is a coroutine; ``crops`` is an async iterator."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = _auth(api_key)
        self.http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, transport=transport)

    async def __aenter__(self) -> AsyncImgsiftClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def _send(self, call: _Call[T]) -> T:
        try:
            return call.read(_check(await self.http.request(call.method, call.path, **call.kwargs)))
        except httpx.TransportError as exc:
            raise ImgsiftError(f"cannot reach the imgsift API: {exc}") from exc

    async def create_job(
        self,
        spec: dict[str, Any],
        references: Iterable[FileLike],
        *,
        negatives: Iterable[FileLike] = (),
        idempotency_key: str | None = None,
    ) -> Job:
        return await self._send(_Requests.create_job(spec, references, negatives, idempotency_key))

    async def get_job(self, job_id: str) -> Job:
        return await self._send(_Requests.get_job(job_id))

    async def list_jobs(self, limit: int = 100) -> list[Job]:
        return await self._send(_Requests.list_jobs(limit))

    async def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll: float = 1.0,
        on_progress: ProgressCallback | None = None,
    ) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = await self.get_job(job_id)
            if on_progress:
                result = on_progress(job)
                if asyncio.iscoroutine(result):
                    await result
            if job.is_final:
                return _final(job)
            _check_deadline(deadline, f"job {job_id} still {job.state} after {timeout} s", job)
            await asyncio.sleep(poll)

    async def set_threshold(self, job_id: str, threshold: float) -> Job:
        return await self._send(_Requests.set_threshold(job_id, threshold))

    async def cancel(self, job_id: str) -> Job:
        return await self._send(_Requests.cancel(job_id))

    async def train(self, job_id: str) -> Job:
        return await self._send(_Requests.train(job_id))

    async def mark(self, job_id: str, crop_id: str, correct: bool | None) -> Calibration:
        return await self._send(_Requests.mark(job_id, crop_id, correct))

    async def questions(self, job_id: str, limit: int = 10) -> Questions:
        return await self._send(_Requests.questions(job_id, limit))

    async def crops(
        self, job_id: str, *, threshold: float | None = None, accepted: bool | None = None, page_size: int = 100
    ) -> AsyncIterator[Crop]:
        cursor = None
        while True:
            page = await self._send(_Requests.crops_page(job_id, threshold, accepted, page_size, cursor))
            for c in page["items"]:
                yield Crop.model_validate(c)
            cursor = page["next_cursor"]
            if cursor is None:
                return

    async def export(
        self,
        job_id: str,
        format: str,
        dest: str | Path,
        *,
        threshold: float | None = None,
        originals: bool | None = None,
        embed_images: bool | None = None,
        samples_per_shard: int | None = None,
        timeout: float = 600.0,
        poll: float = 0.5,
    ) -> Export:
        options = {"originals": originals, "embed_images": embed_images, "samples_per_shard": samples_per_shard}
        export = await self._send(_Requests.start_export(job_id, format, threshold, options))
        deadline = time.monotonic() + timeout
        while export.state in ("queued", "running"):
            _check_deadline(deadline, f"export {export.id} still {export.state} after {timeout} s", export)
            await asyncio.sleep(poll)
            export = await self._send(_Requests.get_export(job_id, export.id))
        download_url = _downloadable(export)
        async with self.http.stream("GET", download_url) as response:
            if not response.is_success:
                await response.aread()
                _check(response)
            with Path(dest).open("wb") as out:
                async for chunk in response.aiter_bytes():
                    out.write(chunk)
        return export
