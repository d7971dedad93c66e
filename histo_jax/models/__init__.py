"""Models: EfficientNet-B0 encoder, cross-attention fusion classifier, PyTorch weight import."""
