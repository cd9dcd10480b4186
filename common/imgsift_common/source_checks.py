"""What an operator must have configured before a job's sources can run: checked when the job is created.

One implementation for the API (``POST /v1/jobs`` answers 422) and the embedded ``imgsift
collect`` (a usage error), so a job that cannot run is refused with what to set, rather than
created and failing in the crawler later.
"""

from __future__ import annotations

from imgsift_common.messages import JobSpec, SourceKind

WIKIMEDIA_CONTACT = (
    "a 'wikimedia' source needs the operator's contact: Wikimedia requires one in the User-Agent of API "
    "clients (its User-Agent policy) and answers 403 without it. Set IMGSIFT_CRAWLER_CONTACT to a mail "
    "address or URL where you can be reached (for the crawler and the API alike), or leave out 'wikimedia'"
)


def unmet_requirements(spec: JobSpec, *, contact: str | None) -> list[str]:
    """Why the job's sources cannot run with this configuration (empty: they can)."""
    problems = []
    if any(s.kind is SourceKind.WIKIMEDIA for s in spec.sources) and not (contact or "").strip():
        problems.append(WIKIMEDIA_CONTACT)
    return problems
