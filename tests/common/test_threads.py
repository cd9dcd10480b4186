"""IMGSIFT_{DETECTOR,SIAMESE}_TORCH_THREADS cap torch's threads in a model worker's process.

Each case runs in a fresh interpreter: torch's thread count is process-wide.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Load the model as the worker does, and run it once.
LOAD = {
    "detector": "from PIL import Image\n"
    "from imgsift_detector.settings import DetectorSettings\n"
    "from imgsift_detector.model import detector_from_settings\n"
    "detector_from_settings(DetectorSettings(storage='local')).predict([Image.new('RGB', (96, 64))])\n",
    "siamese": "import torch\n"
    "from imgsift_siamese.settings import SiameseSettings\n"
    "from imgsift_siamese.embed import get_embedder\n"
    "get_embedder(SiameseSettings(storage='local')).network.embed(torch.zeros(1, 3, 224, 224))\n",
}


def _threads_after_loading(service: str, env: dict[str, str]) -> int:
    code = LOAD[service] + "import torch\nprint(torch.get_num_threads())\n"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.parametrize("service", ["detector", "siamese"])
def test_the_worker_model_runs_on_the_threads_the_setting_allows(service: str, yolo_weights: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_TORCH_THREADS")}
    env["IMGSIFT_DETECTOR_WEIGHTS"] = str(yolo_weights)
    probe = "import torch; from ultralytics.utils import NUM_THREADS; print(torch.get_num_threads(), NUM_THREADS)"
    found = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    default, ultralytics = (int(v) for v in found.stdout.split()[-2:])
    # Unset (0), the libraries choose: torch one thread per core, ultralytics (the detector) its own count.
    assert _threads_after_loading(service, env) == (ultralytics if service == "detector" else default)
    wanted = max(default, ultralytics) + 1  # a count neither would pick by itself
    assert _threads_after_loading(service, {**env, f"IMGSIFT_{service.upper()}_TORCH_THREADS": str(wanted)}) == wanted
