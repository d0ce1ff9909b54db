"""Typed exceptions raised at the package's boundaries.

Every message names what was expected and what was found, so a caller (or a Triton client
reading an error string) can fix the request without reading our source. Errors that belong to
one part live next to it (`ManifestError` in `allspark.contract`, `ExportError` in the exporter);
the ones several parts raise are here.
"""

from __future__ import annotations


class AllSparkError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(AllSparkError, ValueError):
    """A configuration, preset or option is inconsistent."""


class UnknownModalityError(AllSparkError, KeyError):
    def __init__(self, name: object, known: tuple[str, ...]):
        self.name = name
        self.known = known
        super().__init__(f"unknown modality {name!r}; expected one of: {', '.join(known)}")

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.args[0]


class ModalityNotInBuildError(UnknownModalityError):
    """A registered modality that this build (or server) was not exported with."""

    def __init__(self, name: str, have: tuple[str, ...], export_command: str = ""):
        self.name, self.known = name, have
        AllSparkError.__init__(self, f"{name} is not in this build (it has: {', '.join(have)}); re-export with it"
                               + (f": {export_command}" if export_command else ""))


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


class BackendError(AllSparkError, RuntimeError):
    """A runtime backend cannot be created or cannot run (unknown name, missing provider, ...)."""


class NumericsError(AllSparkError, ArithmeticError):
    """A request's computation produced a non-finite value (NaN or inf) at some stage."""

    def __init__(self, modality: str, stage: str):
        self.modality, self.stage = modality, stage
        super().__init__(f"{modality}: a non-finite value (NaN or inf) appeared at the {stage} stage; "
                         "the input is out of the range the model handles")


class DeadlineExceeded(AllSparkError, TimeoutError):
    """A request ran (or waited) past the deadline it was given."""
