"""The ``imgsift`` command line: the whole pipeline in one process (the embedded default)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from imgsift.embedded import EmbeddedConfig, EmbeddedError, EmbeddedRunner, Progress
from imgsift_common.messages import KEYWORD_SOURCES, DedupSpec, JobSpec, Limits, SourceKind, SourceSpec

app = typer.Typer(
    help="imgsift: build clean, labelled image datasets from the open web.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SOURCE_HELP = (
    "where images come from (repeatable): urls:FILE (.txt one URL per line, .csv/.tsv with a url column, "
    ".parquet), site:URL (crawl from URL), and the keyword searches openverse, wikimedia, bing, duckduckgo, "
    "flickr (needs IMGSIFT_CRAWLER_FLICKR_API_KEY); these search --query, or their own after a colon: bing:QUERY"
)


@app.callback()
def _main() -> None:
    """imgsift: crawl candidate images, detect and crop objects with YOLO, keep the crops a
    Siamese network finds close to your reference images."""


def parse_source(value: str, max_depth: int, max_pages: int) -> SourceSpec:
    """``urls:FILE``, ``site:URL``, or a keyword source (``openverse``, ``bing``...), optionally ``bing:QUERY``."""
    kind, _, arg = value.partition(":")
    try:
        source_kind = SourceKind(kind.strip().lower())
    except ValueError:
        kinds = ", ".join(k.value for k in SourceKind)
        raise typer.BadParameter(f"unknown source {kind!r}; use one of {kinds}", param_hint="--source") from None
    if source_kind is SourceKind.URLS:
        if not arg or not Path(arg).is_file():
            raise typer.BadParameter(f"urls:FILE needs an existing file, got {arg!r}", param_hint="--source")
        return SourceSpec(kind=source_kind, path=str(Path(arg).resolve()))
    if source_kind is SourceKind.SITE:
        if not arg.startswith(("http://", "https://")):
            raise typer.BadParameter(f"site:URL needs an http(s) URL, got {arg!r}", param_hint="--source")
        return SourceSpec(kind=source_kind, start_urls=[arg], max_depth=max_depth, max_pages=max_pages)
    assert source_kind in KEYWORD_SOURCES
    return SourceSpec(kind=source_kind, query=arg or None)


class BarProgress(Progress):
    """tqdm bars on stderr, one per stage, whose totals grow as discovery finds more."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bars: dict[str, Any] = {}

    def stage(self, name: str, total: int | None) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from tqdm import tqdm

        bar = self.bars.get(name)
        if bar is None:
            bar = tqdm(total=total, desc=f"{name:>8}", unit="img", file=sys.stderr, position=len(self.bars), leave=True)
            self.bars[name] = bar
        elif total:
            bar.total = (bar.total or 0) + total
            bar.refresh()
        return bar.update  # type: ignore[no-any-return]

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


@app.command()
def collect(
    out: Annotated[Path, typer.Option(help="output folder: accepted/, rejected/, manifest.jsonl")],
    refs: Annotated[Path, typer.Option(help="folder (or file) of reference images of what to collect")],
    target: Annotated[str, typer.Option(help="detector class (dog), COCO supercategory (animal) or 'any'")],
    source: Annotated[list[str], typer.Option(help=SOURCE_HELP)],
    query: Annotated[str | None, typer.Option(help="keywords for the keyword sources (openverse, bing...)")] = None,
    threshold: Annotated[
        float | None, typer.Option(help="accept crops with distance <= this (default: the folder's last, else 0.9)")
    ] = None,
    yolo_weights: Annotated[
        str, typer.Option(help="YOLO weights: a local .pt path, or a name ultralytics downloads")
    ] = "yolov8n.pt",
    backbone: Annotated[
        str, typer.Option(help="Siamese backbone: mobilenet_v2 or mobilenet_v3_small")
    ] = "mobilenet_v2",
    siamese_weights: Annotated[
        Path | None, typer.Option(help="local backbone weights file (default: built in)")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:0, mps")] = "cpu",
    max_images: Annotated[int, typer.Option(help="images to store at most")] = 500,
    per_source: Annotated[int, typer.Option(help="candidate URLs per source at most")] = 200,
    max_depth: Annotated[int, typer.Option(help="link depth of a site crawl")] = 2,
    max_pages: Annotated[int, typer.Option(help="pages a site crawl fetches at most")] = 200,
    want_accepted: Annotated[
        int | None,
        typer.Option(
            help="give me N: keep paging, then widening the query, until N crops are accepted or the sources run dry"
        ),
    ] = None,
    related: Annotated[
        list[str] | None,
        typer.Option(help="a query to widen to, in order (repeat; default: the built-in related terms)"),
    ] = None,
    related_terms: Annotated[
        Path | None, typer.Option(help="JSON file of related terms and translations, replacing the built-in list")
    ] = None,
    language: Annotated[
        list[str] | None, typer.Option(help="also search the query's translation into this language (repeat; de, fr)")
    ] = None,
    near_dup_distance: Annotated[
        int | None,
        typer.Option(help="perceptual-hash bits within which images are near-duplicates (-1: off; default 6)"),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Crawl, detect, crop and verify in one process; rerun with another --threshold to re-decide instantly."""
    from imgsift_crawler.settings import CrawlerSettings
    from imgsift_detector.settings import DetectorSettings
    from imgsift_siamese.settings import SiameseSettings

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    state_dir = out / ".imgsift"
    try:
        specs = [parse_source(s, max_depth, max_pages) for s in source]
        previous = _previous_threshold(out)
        spec = JobSpec(
            query=query,
            sources=specs,
            target=target,
            threshold=threshold if threshold is not None else previous if previous is not None else 0.9,
            limits=Limits(max_images=max_images, per_source=per_source),
            want_accepted=want_accepted,
            related_queries=related or None,
            languages=language or [],
            dedup=DedupSpec(near_distance=near_dup_distance),
        )
        if related_terms is not None and not related_terms.is_file():
            raise typer.BadParameter(f"{related_terms} is not a file", param_hint="--related-terms")
        local = {"storage": "local", "local_storage_dir": state_dir / "objects"}
        config = EmbeddedConfig(
            out=out,
            spec=spec,
            refs=refs,
            crawler=CrawlerSettings(**local, related_terms=str(related_terms) if related_terms else None),
            detector=DetectorSettings(**local, weights=yolo_weights, device=device),
            siamese=SiameseSettings(**local, backbone=backbone, weights=siamese_weights, device=device),
        )
    except ValidationError as exc:
        raise typer.BadParameter(_first_error(exc)) from None
    if not refs.exists():
        raise typer.BadParameter(f"{refs} does not exist", param_hint="--refs")

    progress = BarProgress(enabled=not quiet)
    runner = EmbeddedRunner(config, progress)
    try:
        summary = runner.run()
    except EmbeddedError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    finally:
        progress.close()
        runner.close()
    typer.echo(
        f"{summary.downloaded} images stored ({summary.duplicates} duplicates, {summary.failed} failed), "
        f"{summary.crops} crops, {summary.compared} compared; at threshold {summary.threshold}: "
        f"{summary.accepted} accepted, {summary.rejected} rejected -> {out}"
    )
    if summary.discovery is not None:
        typer.echo(f"discovery stopped: {summary.discovery.value}")
    if summary.failed_by_reason:
        typer.echo("failed: " + ", ".join(f"{n} {reason}" for reason, n in summary.failed_by_reason.items()))
    for note in summary.notes:
        typer.echo(f"note: {note}")


def _previous_threshold(out: Path) -> float | None:
    from imgsift_common.state import SqliteStateStore

    path = out / ".imgsift" / "state.sqlite"
    if not path.exists():
        return None
    state = SqliteStateStore(path)
    try:
        job = state.get_job("local")
        return job.spec.threshold if job else None
    finally:
        state.close()


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"]


def main() -> None:
    app()


if __name__ == "__main__":
    main()
