"""The networks and heads: ViT-L, the 3D ConvNeXt and its 2D-to-3D inflation, the four
logistic regressions, lungmask's R231 U-Net.
"""
