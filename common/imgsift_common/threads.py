"""How many threads torch's math may use in this process (a detector or Siamese worker).

torch starts with one thread per core it can see, and in a container that is every core of
the node, not the CPUs the pod asked for: two workers on a 2-CPU request of a 32-core node
would each run 32 threads on 2 CPUs. ``IMGSIFT_DETECTOR_TORCH_THREADS`` and
``IMGSIFT_SIAMESE_TORCH_THREADS`` cap it (the Kubernetes manifests set them from the pod's CPU
request); 0 leaves torch's default.
"""

from __future__ import annotations


def limit_torch_threads(threads: int) -> None:
    """Let torch use ``threads`` threads in this process from now on (0: leave torch's default)."""
    if threads <= 0:
        return
    import torch  # only the model workers call this; the API and crawler have no torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
