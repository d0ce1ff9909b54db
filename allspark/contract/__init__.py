"""allspark.contract: the bottom floor every part shares — tensor and component names, symbolic
dims and their ranges, dtype tables, artifact formats (`tensors`), and the build manifest's
schema, reader and typed views (`manifest`). It imports nothing of the package above `errors`."""

from .manifest import (
    SCHEMA_VERSION,
    CacheIO,
    ManifestError,
    Route,
    artifact,
    component_files,
    decoder_cache,
    read_manifest,
    routes,
    validate_manifest,
    write_manifest,
)
from .tensors import (
    ONNX,
    ArtifactFormat,
    DimRange,
    Kind,
    TensorSpec,
    artifact_format,
    component_name,
    register_artifact_format,
)

__all__ = ["ONNX", "SCHEMA_VERSION", "ArtifactFormat", "CacheIO", "DimRange", "Kind", "ManifestError", "Route",
           "TensorSpec", "artifact", "artifact_format", "component_files", "component_name", "decoder_cache",
           "read_manifest", "register_artifact_format", "routes", "validate_manifest", "write_manifest"]
