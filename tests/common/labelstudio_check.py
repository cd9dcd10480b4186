"""Check imgsift ``labelstudio`` tasks with label-studio-sdk: its LabelInterface validates each prediction.

Run by test_exports_training with an interpreter that has label_studio_sdk (it may not be this venv's).
Usage: labelstudio_check.py CONFIG.xml TASKS.json; prints {"tasks": n, "errors": [...]}.
"""

import json
import sys
from pathlib import Path

from label_studio_sdk.label_interface import LabelInterface  # type: ignore[import-not-found]

interface = LabelInterface(Path(sys.argv[1]).read_text())
tasks = json.loads(Path(sys.argv[2]).read_text())
errors = []
for n, task in enumerate(tasks):
    for obj in interface.objects:  # each object tag's $variable must be in the task's data
        if obj.value_is_variable and task["data"].get(obj.value_name) is None:
            errors.append(f"task {n}: no data.{obj.value_name}")
    for prediction in task.get("predictions", []):
        problems = interface.validate_prediction(prediction, return_errors=True)
        errors += [f"task {n}: {p}" for p in problems or []]
print(json.dumps({"tasks": len(tasks), "errors": errors}))
