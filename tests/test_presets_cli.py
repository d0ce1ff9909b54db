"""Presets (the paper's parameter accounting) and the `allspark` command line."""

from __future__ import annotations

import json

import pytest
import torch

from allspark.cli import main
from allspark.errors import ConfigError
from allspark.model import AllSpark, get_preset
from allspark.model.config import AllSparkConfig, LLMConfig
from allspark.model.counting import count_parameters


@pytest.fixture(scope="module")
def paper_counts():
    with torch.device("meta"):
        return count_parameters(AllSpark(get_preset("paper")))


def test_paper_language_row_and_bridge(paper_counts):
    lang = paper_counts["language"]
    assert round(lang["components"]["base_llm"] / 1e6, 2) == 6607.34  # LLaMA-7B without lm_head
    assert round(lang["components"]["adapters"] / 1e6, 2) == 268.66  # 16 adapters 4096->2048->4096
    assert abs(lang["total"] / 1e6 - 6876.02) < 0.015  # Table XV prints 6876.02 (6876.01 + rounding)
    assert round(lang["trainable"] / 1e6, 2) == 268.66
    assert round(paper_counts["rgb"]["components"]["bridge"] / 1e6, 2) == 419.76  # 1408-wide media
    rgb = paper_counts["rgb"]
    assert round(rgb["components"]["encoder"] / 1e6, 2) == 986.80  # Lynx's create_eva_vit_g: 39 blocks, 420 px
    assert rgb["trainable"] == rgb["total"] - rgb["components"]["base_llm"] - rgb["components"]["encoder"]  # EVA frozen


def test_config_round_trips_through_json():
    for name in ("tiny", "demo", "paper"):
        cfg = get_preset(name)
        assert AllSparkConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_bad_configs_say_what_to_fix():
    with pytest.raises(ConfigError, match="must divide by num_heads"):
        LLMConfig(vocab_size=10, hidden_size=30, num_layers=1, num_heads=4, intermediate_size=8, adapter_size=2)
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        get_preset("huge")
    with pytest.raises(ConfigError, match="unknown fields"):
        AllSparkConfig.from_dict({**get_preset("tiny").to_dict(), "llm": {"hidden": 3}})


def test_cli_info_json_matches_counts(capsys, paper_counts):
    assert main(["info", "--preset", "paper", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["modalities"]) == set(paper_counts)
    assert out["modalities"]["rgb"]["components"].keys() == {"encoder", "bridge", "adapters", "head", "base_llm"}
    assert out["modalities"]["language"] == paper_counts["language"]


def test_cli_new_info_convert(tmp_path, capsys, tiny_model):
    from allspark.model.lynx import export_lynx_state

    assert main(["new", "--preset", "tiny", "--out", str(tmp_path / "ck"), "--modalities", "sar", "hsi"]) == 0
    assert main(["info", str(tmp_path / "ck")]) == 0
    assert "sar" in capsys.readouterr().out
    torch.save(export_lynx_state(tiny_model, "rgb"), tmp_path / "lynx.pt")
    tiny_model.llm.save_pretrained(tmp_path / "vicuna")
    tiny_model.tokenizer.save_pretrained(tmp_path / "vicuna")
    dims = {"encoder": {"heads": 2}, "bridge": {"heads": 2}, "labels": list(tiny_model.config.modality("rgb").labels)}
    (tmp_path / "dims.json").write_text(json.dumps(dims))
    args = ["convert", "--lynx", str(tmp_path / "lynx.pt"), "--llm", str(tmp_path / "vicuna"),
            "--modality", "rgb", "--out", str(tmp_path / "conv"), "--config", str(tmp_path / "dims.json")]
    assert main(args) == 0
    assert json.loads((tmp_path / "conv/manifest.json").read_text())["modalities"] == ["rgb"]
    with pytest.raises(SystemExit):  # argparse rejects an unknown preset with its usage message
        main(["info", "--preset", "nope"])


def test_cli_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
