"""Bad input per modality: a typed InputError naming modality, field, expected and actual."""

from __future__ import annotations

import numpy as np
import pytest

from allspark.errors import InputError, UnknownLabelSetError, UnknownModalityError

rng = np.random.default_rng(0)
IMG = rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)

CASES = [
    # (modality, inputs, field, fragment of the message)
    ("rgb", {"image": rng.random((28, 28, 4))}, "image", "channels=3"),
    ("rgb", {"image": rng.random((28, 28))}, "image", "rank 3"),
    ("rgb", {"image": np.array([["a"]])}, "image", "dtype <U1"),
    ("rgb", {"image": np.full((28, 28, 3), np.nan)}, "image", "NaN"),
    ("rgb", {"image": np.zeros((9000, 20, 3), np.uint8)}, "image", "axis 0"),
    ("rgb", {}, "image", "missing field"),
    ("rgb", {"image": IMG, "extra": 1}, "extra", "unknown field"),
    ("msi", {"image": rng.random((16, 16, 12))}, "image", "bands=13"),
    ("msi", {"image": np.full((16, 16, 13), np.inf)}, "image", "inf"),
    ("hsi", {"spectrum": rng.random(102)}, "spectrum", "bands=103"),
    ("sar", {"image": rng.random((32, 32, 3))}, "image", "{1,2}"),
    ("table", {"discrete": np.array([1.5, 2, 3]), "continuous": rng.random(9)}, "discrete", "integer"),
    ("table", {"discrete": np.array([1, 2, 99]), "continuous": rng.random(9)}, "discrete[2]", "[0, 15]"),
    ("table", {"discrete": np.array([1, 2, 3]), "continuous": rng.random(8)}, "continuous", "columns=9"),
    ("trajectory", {"observed": rng.random((7, 2))}, "observed", "steps=8"),
    ("graph", {"series": rng.random((12, 12, 1)), "time_of_day": 288, "day_of_week": 1}, "time_of_day", "[0, 287]"),
    ("graph", {"series": rng.random((11, 12, 1)), "time_of_day": 1, "day_of_week": 1}, "series", "nodes=12"),
    ("point_cloud", {"points": rng.random((100_001, 3))}, "points", "points=1..100000"),
    ("point_cloud", {"points": rng.random((50, 2))}, "points", "xyz+features=3"),
    ("language", {"text": ""}, "text", "non-empty"),
    ("language", {"text": 42}, "text", "a str"),
    ("language", {"text": "word " * 300}, "text", "at most 400 tokens"),
    ("code", {"text": "x" * 100_001}, "text", "at most 100000 characters"),
]


@pytest.mark.parametrize("modality,inputs,field,fragment", CASES, ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_a_clear_error(tiny_model, modality, inputs, field, fragment):
    with pytest.raises(InputError) as e:
        tiny_model.prepare(modality, inputs)
    assert e.value.modality == modality and e.value.field == field
    assert fragment in str(e.value), str(e.value)


def test_every_modality_has_bad_input_cases():
    from allspark.modalities import Modality

    assert {c[0] for c in CASES} == {m.value for m in Modality}


def test_unknown_modality(tiny_model):
    with pytest.raises(UnknownModalityError, match="expected one of: language, code"):
        tiny_model.prepare("video", {})


def test_unknown_label_set(tiny_model):
    assert tiny_model.labels("rgb", "NWPU-RESISC45")[0] == "airplane"
    with pytest.raises(UnknownLabelSetError, match="'UCM'.*'NWPU-RESISC45'"):
        tiny_model.labels("rgb", "UCM")


def test_modality_missing_from_model(tiny_model):
    from allspark.model.factory import build_model

    small = build_model("tiny", modalities=["sar"])
    with pytest.raises(UnknownModalityError, match="expected one of: sar"):
        small.prepare("rgb", {"image": IMG})
