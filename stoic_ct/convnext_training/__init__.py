"""Training the 3D ConvNeXt: augmentation, the training engine, fine-tuning, pretraining."""
