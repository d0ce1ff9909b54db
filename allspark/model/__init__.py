"""The PyTorch reference model of AllSpark."""

from .config import AllSparkConfig, HeadKind, Modality, Precision, get_preset
from .model import AllSpark, Row
from .registry import REGISTRY, resolve_modality, spec

__all__ = ["AllSpark", "AllSparkConfig", "HeadKind", "Modality", "Precision", "REGISTRY", "Row",
           "get_preset", "resolve_modality", "spec"]
