"""AllSpark inference runtime: a PyTorch reference model, ONNX export, runtime, kernels and serving."""

__version__ = "0.1.0"
