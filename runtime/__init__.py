"""The on-device runtime: numpy + an inference engine (ONNX Runtime or TensorRT), never torch.

This package must not import torch, open_clip, sglora_edge or export, so it installs
on a Jetson without PyTorch (tests/test_no_torch.py proves it).
"""
