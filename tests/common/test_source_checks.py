"""The operator settings a job's sources need, checked at job creation (API and CLI share it)."""

from __future__ import annotations

from imgsift_common.messages import JobSpec, SourceKind, SourceSpec
from imgsift_common.source_checks import unmet_requirements


def _spec(*kinds: SourceKind) -> JobSpec:
    return JobSpec(query="cat", target="cat", sources=[SourceSpec(kind=k) for k in kinds])


def test_wikimedia_needs_a_contact_and_the_other_sources_do_not() -> None:
    [problem] = unmet_requirements(_spec(SourceKind.OPENVERSE, SourceKind.WIKIMEDIA), contact=None)
    assert "IMGSIFT_CRAWLER_CONTACT" in problem and "403" in problem
    assert unmet_requirements(_spec(SourceKind.WIKIMEDIA), contact="  ") == [problem]
    assert unmet_requirements(_spec(SourceKind.WIKIMEDIA), contact="ops@example.org") == []
    assert unmet_requirements(_spec(SourceKind.OPENVERSE, SourceKind.BING), contact=None) == []
