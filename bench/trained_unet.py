"""An R231 U-Net trained for a few minutes on phantoms, so that the benchmark has real masks.

The real R231 weights cannot be downloaded here, and random ones find no lung, on which
the published package stops. Trained on phantom slices against the threshold stand-in's
labels (lungmask's own preprocessing, at 128 x 128 to keep it short), the network agrees
with those labels on about 99 % of voxels and gives both implementations the same,
non-trivial masks to work from. Its numbers mean nothing beyond that.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from stoic_ct.models.r231 import r231_network
from stoic_ct.phantom import PhantomSpec, make_phantom
from stoic_ct.preprocessing.lung_segmentation import threshold_lungs
from stoic_ct.preprocessing.resampling import resample
from stoic_ct.weights.random_weights import random_r231_state_dict

SIZE = 128


def _training_slices(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """lungmask-preprocessed phantom slices and their threshold labels, (N, 1, S, S), (N, S, S)."""
    from lungmask import utils

    inputs, targets = [], []
    for index, burden in enumerate((0.0, 0.05, 0.1, 0.25)):
        spec = PhantomSpec(
            size=(128, 128, 24),
            spacing=(2.8, 2.8, 5.0),
            origin=(-179.2, -179.2, -60.0),
            lesion_burden=burden,
            seed=seed + index,
        )
        volume = resample(make_phantom(spec))
        labels = threshold_lungs(volume)
        slices, boxes = utils.preprocess(volume.voxels, resolution=[SIZE, SIZE])
        slices = (np.minimum(slices, 600) + 1024) / 1624
        for k, box in enumerate(boxes):
            crop = labels[k][box[0] : box[2], box[1] : box[3]]
            inputs.append(slices[k])
            targets.append(ndimage.zoom(crop, np.array([SIZE, SIZE]) / crop.shape, order=0))
    return (
        torch.tensor(np.array(inputs)[:, None], dtype=torch.float32),
        torch.tensor(np.array(targets), dtype=torch.long),
    )


def train_r231(dest: Path, iterations: int = 150, seed: int = 0) -> Path:
    """Write R231 weights trained on phantoms to `dest` (a few minutes on 2 CPU cores)."""
    torch.manual_seed(seed)
    inputs, targets = _training_slices(seed)
    model = r231_network()
    model.load_state_dict(random_r231_state_dict(seed=seed))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    started = time.perf_counter()
    for iteration in range(iterations):
        batch = torch.randint(0, len(inputs), (4,))
        loss = torch.nn.functional.nll_loss(model(inputs[batch]), targets[batch])
        optimiser.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
        if iteration % 25 == 0:
            print(
                f"training the phantom R231 U-Net: step {iteration}/{iterations}, "
                f"loss {loss.item():.3f}, {time.perf_counter() - started:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, dest)
    return dest
