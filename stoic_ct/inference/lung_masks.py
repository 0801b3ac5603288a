"""lungmask's R231 U-Net on a device, run as lungmask runs it, from a local weights file.

lungmask's pre- and post-processing are stoic_ct.preprocessing.lung_segmentation's
(`lungmask_input`, `lungmask_labels`); this module runs the network between them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from stoic_ct.inference.precision import CalibratedInt8, check_precision, numerics, uses_int8
from stoic_ct.io.volume import Volume
from stoic_ct.models.r231 import r231_network
from stoic_ct.preprocessing.lung_segmentation import lungmask_input, lungmask_labels
from stoic_ct.weights.checkpoints import check_r231_weights, load_state_dict, release_file_pages
from stoic_ct.weights.model_files import R231

# Slices per U-Net batch by device type: throughput is flat from 4 on a CPU and 8 on a GPU;
# each slice holds about 120 MB of activations (float32, the memory model).
R231_BATCH = {"cuda": 8, "cpu": 4}


class R231Segmenter:
    """lungmask's R231 U-Net, run as lungmask runs it, from a local weights file.

    lungmask's own pre- and post-processing (body crop and resize to 256 x 256, the 3D
    connected-component clean-up, the resize back) are used as they are, the per-slice
    steps on several threads; only the network runs differently: weights memory-mapped and
    released after use, channels-last memory on a CPU, batches sized to the device, and in
    the fast precision int8 or bfloat16 (CPU) or float16 (GPU). In the exact precision the
    labels equal lungmask's `LMInferer`.
    """

    def __init__(
        self,
        weights: Path,
        device: torch.device,
        batch_size: int | None = None,
        precision: str = "exact",
    ) -> None:
        check_r231_weights(weights)
        self.weights, self.device, self.precision = weights, device, check_precision(precision)
        self.batch_size = batch_size or R231_BATCH[device.type]
        with torch.device("meta"):
            model = r231_network()
        state = load_state_dict(weights, R231)
        for key, value in model.state_dict().items():  # counters old checkpoints lack
            if key.endswith("num_batches_tracked") and key not in state:
                state[key] = torch.zeros(value.shape, dtype=value.dtype)
        model.load_state_dict(state, strict=True, assign=True)
        model = model.eval().requires_grad_(False)
        # lungmask logs every stage to stdout at INFO, which would mix with our results.
        logging.getLogger("lungmask").setLevel(logging.WARNING)
        if device.type == "cuda":
            self._network: Callable[[torch.Tensor], torch.Tensor] = model.to(device)
            self._mapped: list[torch.Tensor] = []
        else:
            self._mapped = list(model.state_dict().values())
            self._network = model.to(memory_format=torch.channels_last)
        self._model = model
        self._int8: CalibratedInt8 | None = None

    def __call__(self, volume: Volume) -> np.ndarray:
        """Lung labels for `volume`, (z, y, x) uint8, same grid."""
        unet_input = lungmask_input(volume)
        return lungmask_labels(self.classify(unet_input.slices), unet_input)

    @torch.inference_mode()
    def classify(self, slices: np.ndarray) -> np.ndarray:
        """(Z, 256, 256) inputs in [0, 1] -> (Z, 256, 256) uint8 argmax classes."""
        out = np.empty(slices.shape, dtype=np.uint8)
        if uses_int8(self.device, self.precision) and self._int8 is None:
            # Ranges from slices across the scan, top, middle and bottom.
            picks = np.linspace(0, len(slices) - 1, num=min(3, len(slices))).round().astype(int)
            samples = torch.as_tensor(slices[picks, None], dtype=torch.float32)
            self._int8 = CalibratedInt8(self._model, samples)
            self._network = self._int8
        with numerics(self.device, self.precision):
            for start in range(0, len(slices), self.batch_size):
                chunk = slices[start : start + self.batch_size]
                classes = classify_slices(self._network, chunk, self.device)
                out[start : start + len(classes)] = classes.cpu().numpy()
        release_file_pages(self._mapped, self.weights)
        return out


def classify_slices(
    network: Callable[[torch.Tensor], torch.Tensor],
    slices: np.ndarray | torch.Tensor,
    device: torch.device,
) -> torch.Tensor:
    """(B, 256, 256) U-Net inputs in [0, 1] -> (B, 256, 256) uint8 argmax classes on
    `device` (channels-last memory on a CPU)."""
    batch = torch.as_tensor(slices[:, None], dtype=torch.float32).to(device)
    if device.type == "cpu":
        batch = batch.contiguous(memory_format=torch.channels_last)
    return network(batch).argmax(1).to(torch.uint8)
