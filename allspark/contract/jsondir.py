"""`DIR/manifest.json` read as a JSON object: what checkpoints and builds share."""

from __future__ import annotations

import json
from pathlib import Path


def read_json(directory: str | Path, error: type[Exception], what: str, hint: str = "") -> dict:
    """`directory/manifest.json` as a dict, or `error` saying what is missing or malformed."""
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise error(f"{directory}: not a {what} directory (no manifest.json){hint}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
