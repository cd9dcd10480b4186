"""A small demo web for `imgsift collect`, built from a folder of labelled photos (COCO128 layout).

    python scripts/demo_site.py serve --coco DIR --workdir demo --port 8765
        writes demo/refs/ (reference crops of --ref-class cut from a few held-out photos) and
        demo/urls.txt (a URL list), then serves the other photos on 127.0.0.1 as a small
        site: gallery pages with <img src>, srcset, links to files and og:image.
    python scripts/demo_site.py score --coco DIR --manifest OUT/manifest.jsonl --ref-class person
        compares imgsift's accepted crops with the photos' labelled boxes (IoU >= 0.5).
    python scripts/demo_site.py answer --coco DIR --manifest OUT/manifest.jsonl --ref-class person < QUESTIONS
        answers the crops `imgsift questions` printed from the photos' labels, as a user would:
        one `crop,right` or `crop,wrong` line each, for `imgsift answer --answers`.

Nothing here is part of the product: it stands in for the web when there is no internet.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.coco import COCO_NAMES, Coco128
from tests.support.web import TestWeb, build_photo_site


def split(
    coco: Coco128, ref_class: str, n_ref_images: int, n_site: int, ref_photos: list[str]
) -> tuple[list[Path], list[Path]]:
    """Photos to cut references from, and the photos the site serves (disjoint)."""
    cid = COCO_NAMES.index(ref_class)
    if ref_photos:
        refs = [coco.image(stem) for stem in ref_photos]
        return refs, [p for p in coco.images if p not in refs][:n_site]

    def big(p: Path) -> int:
        return sum(
            1 for b in coco.labels(p) if b.class_id == cid and (b.box[2] - b.box[0]) * (b.box[3] - b.box[1]) > 80 * 80
        )

    candidates = sorted((p for p in coco.images if big(p)), key=big, reverse=True)
    refs = sorted(candidates[:n_ref_images])
    site = [p for p in coco.images if p not in refs][:n_site]
    return refs, site


def write_refs(coco: Coco128, photos: list[Path], ref_class: str, out: Path, max_refs: int) -> list[Path]:
    cid = COCO_NAMES.index(ref_class)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for photo in photos:
        with Image.open(photo) as im:
            for i, b in enumerate(coco.labels(photo)):
                if len(written) >= max_refs:
                    return written
                if b.class_id == cid and (b.box[2] - b.box[0]) * (b.box[3] - b.box[1]) > 80 * 80:
                    path = out / f"{photo.stem}-{i}.jpg"
                    im.convert("RGB").crop(tuple(round(v) for v in b.box)).save(path, quality=95)
                    written.append(path)
    return written


def serve(args: argparse.Namespace) -> None:
    coco = Coco128(Path(args.coco))
    ref_photos = [s for s in args.ref_photos.split(",") if s]
    refs, site = split(coco, args.ref_class, args.ref_images, args.site_images, ref_photos)
    workdir = Path(args.workdir)
    written = write_refs(coco, refs, args.ref_class, workdir / "refs", args.max_refs)
    web = TestWeb(port=args.port)
    split_at = len(site) * 3 // 4
    index = build_photo_site(web, site[:split_at])
    urls = [web.add_image(f"/list/{p.name}", p) for p in site[split_at:]]
    (workdir / "urls.txt").write_text("\n".join(urls) + "\n")
    web.start()
    print(json.dumps({"index": index, "urls_file": str(workdir / "urls.txt"), "refs": len(written)}), flush=True)
    try:
        web.thread.join()
    except KeyboardInterrupt:
        web.stop()


def _truth(coco: Coco128, cid: int, row: dict) -> bool | None:  # type: ignore[type-arg]
    """Whether a manifest row's crop shows the class (a labelled box of it, IoU >= 0.5); None: not a demo photo."""
    photo = {p.name: p for p in coco.images}.get(row["image_url"].rsplit("/", 1)[-1])
    if photo is None:
        return None
    match = coco.match(photo, tuple(row["box"]))
    return match is not None and match.class_id == cid


def score(args: argparse.Namespace) -> None:
    coco = Coco128(Path(args.coco))
    cid = COCO_NAMES.index(args.ref_class)
    tp = fp = fn = tn = 0
    for line in Path(args.manifest).read_text().splitlines():
        row = json.loads(line)
        truth = _truth(coco, cid, row)
        if truth is None:
            continue
        if row["accepted"]:
            tp += truth
            fp += not truth
        else:
            fn += truth
            tn += not truth
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    print(
        json.dumps(
            {"accepted": tp + fp, "rejected": fn + tn, "true_positive": tp, "false_positive": fp,
             "false_negative": fn, "precision": round(precision, 3), "recall": round(recall, 3), "f1": round(f1, 3)}
        )
    )  # fmt: skip


def answer(args: argparse.Namespace) -> None:
    coco = Coco128(Path(args.coco))
    cid = COCO_NAMES.index(args.ref_class)
    rows = {r["crop"]: r for r in map(json.loads, Path(args.manifest).read_text().splitlines())}
    for crop in sys.stdin.read().split():
        print(f"{crop},{'right' if _truth(coco, cid, rows[crop]) else 'wrong'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--coco", required=True)
    p.add_argument("--workdir", default="demo")
    p.add_argument("--ref-class", default="elephant")
    p.add_argument("--ref-images", type=int, default=2, help="photos held out to cut references from")
    p.add_argument("--max-refs", type=int, default=8)
    p.add_argument("--ref-photos", default="", help="comma-separated photo stems to cut references from")
    p.add_argument("--site-images", type=int, default=200, help="photos the demo web serves at most")
    p.add_argument("--port", type=int, default=0)
    s = sub.add_parser("score")
    s.add_argument("--coco", required=True)
    s.add_argument("--manifest", required=True)
    s.add_argument("--ref-class", default="elephant")
    a = sub.add_parser("answer")
    a.add_argument("--coco", required=True)
    a.add_argument("--manifest", required=True)
    a.add_argument("--ref-class", default="elephant")
    args = parser.parse_args()
    {"serve": serve, "score": score, "answer": answer}[args.command](args)


if __name__ == "__main__":
    main()
