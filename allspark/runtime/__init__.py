"""allspark.runtime: the in-process runtime over a build (onnxruntime) or its checkpoint (torch)."""

from .generation import GenerationConfig, Strategy
from .runtime import Prediction, Request, Runtime

__all__ = ["GenerationConfig", "Prediction", "Request", "Runtime", "Strategy"]
