"""The sync and async clients. Both build the same requests (``_Requests``) and read the same
answers; only the I/O differs."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx

from imgsift_client.errors import ImgsiftError, JobFailed, WaitTimeout, error_for
from imgsift_client.models import Calibration, Crop, Export, Job

FileLike = str | Path | bytes | tuple[str, bytes]
ProgressCallback = Callable[[Job], object]


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


def _final(job: Job) -> Job:
    if job.state in ("failed", "cancelled"):
        raise JobFailed(f"job {job.id} ended {job.state}: {job.error or 'no reason given'}", body=job)
    return job


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

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            return _check(self.http.request(method, path, **kwargs))
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
        return Job.model_validate(
            self._call("POST", "/v1/jobs", **_create_args(spec, references, negatives, idempotency_key))
        )

    def get_job(self, job_id: str) -> Job:
        return Job.model_validate(self._call("GET", f"/v1/jobs/{job_id}"))

    def list_jobs(self, limit: int = 100) -> list[Job]:
        return [Job.model_validate(j) for j in self._call("GET", "/v1/jobs", params={"limit": limit})["items"]]

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
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"job {job_id} still {job.state} after {timeout} s", body=job)
            time.sleep(poll)

    def set_threshold(self, job_id: str, threshold: float) -> Job:
        return Job.model_validate(self._call("PATCH", f"/v1/jobs/{job_id}", json={"threshold": threshold}))

    def cancel(self, job_id: str) -> Job:
        return Job.model_validate(self._call("POST", f"/v1/jobs/{job_id}/cancel"))

    def train(self, job_id: str) -> Job:
        return Job.model_validate(self._call("POST", f"/v1/jobs/{job_id}/train"))

    def mark(self, job_id: str, crop_id: str, correct: bool | None) -> Calibration:
        body = self._call("PUT", f"/v1/jobs/{job_id}/crops/{crop_id}/feedback", json={"correct": correct})
        return Calibration.model_validate(body)

    # ------------------------------------------------------------------ crops
    def crops(
        self, job_id: str, *, threshold: float | None = None, accepted: bool | None = None, page_size: int = 100
    ) -> Iterator[Crop]:
        """Every crop (or the accepted / rejected ones) by ascending distance, fetched a page at a time."""
        cursor = None
        while True:
            page = self._call(
                "GET", f"/v1/jobs/{job_id}/crops", params=_crop_params(threshold, accepted, page_size, cursor)
            )
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
        timeout: float = 600.0,
        poll: float = 0.5,
    ) -> Export:
        """Build an export on the server, wait for it, and stream it to ``dest``."""
        body = {"format": format, "threshold": threshold}
        export = Export.model_validate(self._call("POST", f"/v1/jobs/{job_id}/exports", json=body))
        deadline = time.monotonic() + timeout
        while export.state in ("queued", "running"):
            if time.monotonic() > deadline:
                raise WaitTimeout(f"export {export.id} still {export.state} after {timeout} s", body=export)
            time.sleep(poll)
            export = Export.model_validate(self._call("GET", f"/v1/jobs/{job_id}/exports/{export.id}"))
        if export.state != "done" or not export.download_url:
            raise ImgsiftError(f"export {export.id} {export.state}: {export.error}", body=export)
        with self.http.stream("GET", export.download_url) as response:
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

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            return _check(await self.http.request(method, path, **kwargs))
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
        args = _create_args(spec, references, negatives, idempotency_key)
        return Job.model_validate(await self._call("POST", "/v1/jobs", **args))

    async def get_job(self, job_id: str) -> Job:
        return Job.model_validate(await self._call("GET", f"/v1/jobs/{job_id}"))

    async def list_jobs(self, limit: int = 100) -> list[Job]:
        body = await self._call("GET", "/v1/jobs", params={"limit": limit})
        return [Job.model_validate(j) for j in body["items"]]

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
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"job {job_id} still {job.state} after {timeout} s", body=job)
            await asyncio.sleep(poll)

    async def set_threshold(self, job_id: str, threshold: float) -> Job:
        return Job.model_validate(await self._call("PATCH", f"/v1/jobs/{job_id}", json={"threshold": threshold}))

    async def cancel(self, job_id: str) -> Job:
        return Job.model_validate(await self._call("POST", f"/v1/jobs/{job_id}/cancel"))

    async def train(self, job_id: str) -> Job:
        return Job.model_validate(await self._call("POST", f"/v1/jobs/{job_id}/train"))

    async def mark(self, job_id: str, crop_id: str, correct: bool | None) -> Calibration:
        body = await self._call("PUT", f"/v1/jobs/{job_id}/crops/{crop_id}/feedback", json={"correct": correct})
        return Calibration.model_validate(body)

    async def crops(
        self, job_id: str, *, threshold: float | None = None, accepted: bool | None = None, page_size: int = 100
    ) -> AsyncIterator[Crop]:
        cursor = None
        while True:
            params = _crop_params(threshold, accepted, page_size, cursor)
            page = await self._call("GET", f"/v1/jobs/{job_id}/crops", params=params)
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
        timeout: float = 600.0,
        poll: float = 0.5,
    ) -> Export:
        body = {"format": format, "threshold": threshold}
        export = Export.model_validate(await self._call("POST", f"/v1/jobs/{job_id}/exports", json=body))
        deadline = time.monotonic() + timeout
        while export.state in ("queued", "running"):
            if time.monotonic() > deadline:
                raise WaitTimeout(f"export {export.id} still {export.state} after {timeout} s", body=export)
            await asyncio.sleep(poll)
            export = Export.model_validate(await self._call("GET", f"/v1/jobs/{job_id}/exports/{export.id}"))
        if export.state != "done" or not export.download_url:
            raise ImgsiftError(f"export {export.id} {export.state}: {export.error}", body=export)
        async with self.http.stream("GET", export.download_url) as response:
            if not response.is_success:
                await response.aread()
                _check(response)
            with Path(dest).open("wb") as out:
                async for chunk in response.aiter_bytes():
                    out.write(chunk)
        return export
