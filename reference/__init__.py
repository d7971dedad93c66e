"""The original (PyTorch) model, as a reference for parity fixtures and benchmarks.

Needs torch (and torchvision); not part of the installed package.
"""
