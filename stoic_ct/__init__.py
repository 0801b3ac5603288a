"""STOIC2021 COVID-19 CT algorithm: the Balaïtous model, faithful to balaitous 1.2.

Folders by stage: `io` (reading, the container's inputs and outputs), `preprocessing`,
`models`, `inference` (the Balaïtous pipeline, the ConvNeXt, the systems), `weights`
(model files), `head_training`, `convnext_training`; docs/explanation/pipeline.md maps every module.
"""

__version__ = "0.1.0"
