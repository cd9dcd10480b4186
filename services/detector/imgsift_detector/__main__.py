"""``python -m imgsift_detector``: how to start the worker and the settings it reads. Starts nothing."""

from __future__ import annotations

from imgsift_detector.settings import DetectorSettings

USAGE = """imgsift detector: finds the job's target with YOLO and stores padded crops.

Start a worker:  celery -A imgsift_detector.worker worker -Q detect --pool threads --concurrency 2

Settings (environment variables; see .env.example for the shared IMGSIFT_* ones):"""


def main() -> None:
    lines = [USAGE]
    for name, field in DetectorSettings.model_fields.items():
        if field.validation_alias is None:  # the shared fields carry an IMGSIFT_* alias instead
            lines.append(f"  IMGSIFT_DETECTOR_{name.upper():<18} default {field.default!r}: {field.description}")
    print("\n".join(lines))  # noqa: T201 - this is a command line


if __name__ == "__main__":
    main()
