"""Shared fixtures: one tiny model per session (seconds to build), deterministic inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from allspark.model import Modality
from allspark.model.factory import build_model
from allspark.model.samples import random_inputs

ALL_MODALITIES = [m.value for m in Modality]


@pytest.fixture(scope="session")
def tiny_model():
    torch.manual_seed(0)
    return build_model("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_inputs(tiny_model):
    """One valid request per modality, fixed by seed."""
    rng = np.random.default_rng(1234)
    return {m: random_inputs(tiny_model.config.modality(m), rng) for m in ALL_MODALITIES}
