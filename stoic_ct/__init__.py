"""STOIC2021 COVID-19 CT algorithm: the Balaïtous model, faithful to balaitous 1.2.

Stages, one module each: `imageio` (reading), `contract` (the container's inputs and
outputs), `demographics`, `resampling`, `lung_segmentation`, `cropping`, `vit` and
`encoders`, `heads`, and `pipeline`, which wires them around the loaded models.
"""

__version__ = "0.1.0"
