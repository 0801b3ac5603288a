"""Inference: precision modes, the encoders, the Balaïtous pipeline, the ConvNeXt fold
ensembles, the three systems, the QC picture and predict's batch helpers.
"""
