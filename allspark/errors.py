"""Typed exceptions raised at the package's boundaries.

Every message names what was expected and what was found, so a caller (or a Triton client
reading an error string) can fix the request without reading our source.
"""

from __future__ import annotations


class AllSparkError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(AllSparkError, ValueError):
    """A configuration or preset is inconsistent."""


class UnknownModalityError(AllSparkError, KeyError):
    def __init__(self, name: object, known: tuple[str, ...]):
        self.name = name
        self.known = known
        super().__init__(f"unknown modality {name!r}; expected one of: {', '.join(known)}")

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.args[0]


class InputError(AllSparkError, ValueError):
    """A request's input does not match its modality's schema."""

    def __init__(self, modality: str, field: str, expected: str, actual: str):
        self.modality, self.field, self.expected, self.actual = modality, field, expected, actual
        super().__init__(f"{modality}: input {field!r}: expected {expected}, got {actual}")


class UnknownLabelSetError(AllSparkError, ValueError):
    def __init__(self, modality: str, asked: str, available: str):
        self.modality, self.asked, self.available = modality, asked, available
        super().__init__(
            f"{modality}: unknown label set {asked!r}; this checkpoint's label set is {available!r}"
        )


class CheckpointError(AllSparkError, ValueError):
    """A checkpoint directory, manifest or state dict is malformed or does not fit the model."""


def read_json_manifest(directory, error: type[Exception], what: str, hint: str = "") -> dict:
    """`directory/manifest.json` as a dict, or `error` saying what is missing or malformed."""
    import json
    from pathlib import Path

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
