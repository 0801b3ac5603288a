"""The fine-tuned 3D ConvNeXt at inference: a fold ensemble that averages class probabilities.

A fold-ensemble file (`finetune` writes it as convnext3d_<task>.pth) holds:

    format       FORMAT
    size         "micro", "tiny", "small" or "base"
    input_size   S: the cube's side
    window       [low, high] HU of the input window
    task         "covid", "severe" or "severity4"
    classes      the class names, in order
    head         "softmax" (one logit per class) or "sigmoid" (one logit, binary tasks);
                 absent in older files: softmax
    metadata     what each network takes beside the image: ["age", "sex"] (encoded as
                 the Balaïtous heads encode them) or []; absent in older files: []
    folds        [state_dict, ...]: each fold's EMA weights (with the class head)

Every fold votes: the output is the mean of the folds' class probabilities (Kienzle et
al.'s published inference kept the last fold only, by mistake).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from stoic_ct.atomic import atomic_write
from stoic_ct.errors import ModelFileError, StoicError
from stoic_ct.inference.precision import numerics
from stoic_ct.io.demographics import Demographics
from stoic_ct.io.volume import Volume
from stoic_ct.models.convnext3d import SIZES, ConvNeXt3D
from stoic_ct.preprocessing.convnext_preprocessing import classifier_input
from stoic_ct.weights.checkpoints import load_checkpoint
from stoic_ct.weights.model_files import ModelFileSpec, problem

FORMAT = "stoic-ct convnext3d fold ensemble 1"
HEAD_TYPES = ("softmax", "sigmoid")
METADATA = ("age", "sex")  # Demographics.features: age / 100 clipped, sex 1 / 0 / 0.5


def head_outputs(head: str, classes: int) -> int:
    """The head's logits: one (sigmoid, binary tasks) or one per class (softmax)."""
    return 1 if head == "sigmoid" else classes


def head_probabilities(logits: torch.Tensor, head: str) -> torch.Tensor:
    """(N, outputs) logits -> (N, C) class probabilities: the softmax, or for one sigmoid
    logit p the two columns (1 - p, p)."""
    if head == "sigmoid":
        positive = logits[:, 0].sigmoid()
        return torch.stack((1 - positive, positive), dim=1)
    return logits.softmax(dim=1)


def save_fold_ensemble(
    path: Path,
    *,
    folds: Sequence[dict[str, torch.Tensor]],
    size: str,
    input_size: int,
    window: tuple[float, float],
    task: str,
    classes: Sequence[str],
    head: str = "softmax",
    metadata: Sequence[str] = (),
) -> Path:
    """Write the fold ensemble file (module docstring); returns `path`."""
    document = {
        "format": FORMAT,
        "size": size,
        "input_size": input_size,
        "window": [float(window[0]), float(window[1])],
        "task": task,
        "classes": list(classes),
        "head": head,
        "metadata": list(metadata),
        "folds": [dict(fold) for fold in folds],
    }
    return atomic_write(path, lambda f: torch.save(document, f))


def mean_probabilities(
    models: Sequence[torch.nn.Module], x: torch.Tensor, extra: torch.Tensor | None, head: str
) -> torch.Tensor:
    """(1, 1, S, S, S) cube and (1, M) metadata -> (C,) float64: the mean of the models'
    class probabilities."""
    each = torch.cat([head_probabilities(model(x, extra).float(), head) for model in models])
    return each.mean(dim=0).double()


class FoldEnsemble:
    """Every fold's classifier on one device: a CT volume in, (C,) class probabilities out."""

    def __init__(
        self,
        models: Sequence[ConvNeXt3D],
        *,
        input_size: int,
        window: tuple[float, float],
        task: str,
        classes: Sequence[str],
        device: torch.device,
        precision: str = "exact",
        head: str = "softmax",
        metadata: Sequence[str] = (),
    ) -> None:
        self.models = [model.to(device).eval().requires_grad_(False) for model in models]
        self.input_size, self.window, self.task = input_size, window, task
        self.classes = tuple(classes)
        self.device, self.precision = device, precision
        self.head, self.metadata = head, tuple(metadata)

    @classmethod
    def load(
        cls, path: Path, spec: ModelFileSpec, device: torch.device, precision: str = "exact"
    ) -> FoldEnsemble:
        """Read a fold-ensemble file.

        Raises:
            ModelFileError: naming the file when it is missing or not a fold ensemble.
        """
        document = load_checkpoint(path, spec)
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ModelFileError(problem(spec, f"is not a {FORMAT} file"), path)
        size, folds, classes = document["size"], document["folds"], document["classes"]
        if size not in SIZES or not folds:
            raise ModelFileError(problem(spec, f"has size {size!r} and {len(folds)} folds"), path)
        head, metadata = document.get("head", "softmax"), tuple(document.get("metadata", ()))
        if head not in HEAD_TYPES or not set(metadata) <= set(METADATA):
            raise ModelFileError(
                problem(spec, f"has head {head!r} and metadata {list(metadata)}"), path
            )
        outputs = head_outputs(head, len(classes))
        models = []
        for number, weights in enumerate(folds, start=1):
            model = ConvNeXt3D(size, num_classes=outputs, metadata_dim=len(metadata))
            try:
                model.load_state_dict(weights, strict=True)
            except RuntimeError as error:
                detail = " ".join(str(error).strip().splitlines()[:2])[:300]
                raise ModelFileError(problem(spec, f"fold {number}: {detail}"), path) from None
            models.append(model)
        low, high = document["window"]
        return cls(
            models,
            input_size=int(document["input_size"]),
            window=(float(low), float(high)),
            task=str(document["task"]),
            classes=classes,
            device=device,
            precision=precision,
            head=head,
            metadata=metadata,
        )

    @torch.inference_mode()
    def probabilities(
        self, cube: torch.Tensor, demographics: Demographics | None = None
    ) -> np.ndarray:
        """(1, S, S, S) cube in [0, 1] -> (C,) float64: the mean of the folds' probabilities.

        `demographics` is needed when the networks take age and sex (`metadata`).
        """
        x = cube.to(self.device)[None]
        extra = None
        if self.metadata:
            if demographics is None:
                raise StoicError(f"the {self.task} fold ensemble takes age and sex; none given")
            extra = torch.tensor([demographics.features], dtype=torch.float32, device=self.device)
        with numerics(self.device, self.precision):
            mean = mean_probabilities(self.models, x, extra, self.head)
        return mean.cpu().numpy()

    def cube(self, volume: Volume) -> torch.Tensor:
        """The (1, S, S, S) input this ensemble takes, prepared on its device."""
        return classifier_input(volume, self.input_size, self.window, self.device)

    def __call__(self, volume: Volume, demographics: Demographics | None = None) -> np.ndarray:
        """(C,) class probabilities of one CT in HU."""
        return self.probabilities(self.cube(volume), demographics)
