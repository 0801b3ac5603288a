"""Preprocessing: resampling to the working grid, lung masks, the crop and slices the encoders
see (Balaïtous steps 2-7 and 9), and the 3D ConvNeXt's cube.
"""
