"""Shared fixtures: one tiny model per session (seconds to build), deterministic inputs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from allspark.modalities import Modality
from allspark.model.factory import build_model
from allspark.model.registry import random_inputs

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


@pytest.fixture(scope="session")
def ckpt(tiny_model, tmp_path_factory):
    """The tiny model as a checkpoint directory."""
    from allspark.model.checkpoint import save_checkpoint

    return save_checkpoint(tiny_model, tmp_path_factory.mktemp("ck") / "tiny")


@pytest.fixture(scope="session")
def build(ckpt, tmp_path_factory):
    """The tiny checkpoint exported once per session (about a minute on 2 cores), with the decoder's
    static-cache graph (the device-resident tests step it). ALLSPARK_TEST_BUILD
    names a build exported elsewhere instead (`make gpu-check` on a machine whose torch cannot export)."""
    from allspark.export.build import export_build

    if os.environ.get("ALLSPARK_TEST_BUILD"):
        return Path(os.environ["ALLSPARK_TEST_BUILD"])

    out = tmp_path_factory.mktemp("build") / "b"
    export_build(ckpt, out, progress=False, static_cache=True)  # + the decoder's static-cache graph
    return out
