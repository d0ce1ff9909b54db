"""Helpers shared by the python models: the backend's utils module, parameters, output dtypes from
the config, and error responses that fail one request without failing its batch."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ...errors import AllSparkError, InputError, UnknownModalityError


def pb_utils():
    """`triton_python_backend_utils`, which exists only inside a python-backend stub."""
    import triton_python_backend_utils

    return triton_python_backend_utils


def parameters(model_config: dict) -> dict[str, str]:
    return {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}


def output_dtypes(model_config: dict) -> dict[str, np.dtype]:
    """numpy dtype of every output, as the config declares it (never hard-coded in the models)."""
    pb = pb_utils()
    return {o["name"]: np.dtype(pb.triton_string_to_numpy(pb.get_output_config_by_name(model_config, o["name"])["data_type"]))
            for o in model_config["output"]}


def request_parameters(request) -> dict[str, Any]:
    raw = request.parameters()
    return json.loads(raw) if raw else {}


def input_or_none(request, name: str) -> np.ndarray | None:
    t = pb_utils().get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def error_response(err: BaseException):
    """An error response for one request: InputError-like errors are the caller's (INVALID_ARG,
    HTTP 400), anything else is ours (INTERNAL, with the exception type named)."""
    pb = pb_utils()
    if isinstance(err, (InputError, UnknownModalityError)):
        return pb.InferenceResponse(error=pb.TritonError(str(err), pb.TritonError.INVALID_ARG))
    msg = str(err) if isinstance(err, AllSparkError) else f"{type(err).__name__}: {err}"
    return pb.InferenceResponse(error=pb.TritonError(msg, pb.TritonError.INTERNAL))


def tensor(name: str, value: np.ndarray, dtype: np.dtype):
    """An output tensor in the dtype the config declares (strings as UTF-8 bytes objects)."""
    pb = pb_utils()
    if dtype == np.object_:
        value = np.vectorize(lambda s: s.encode("utf-8") if isinstance(s, str) else s, otypes=[object])(value)
        return pb.Tensor(name, value.astype(np.object_))
    return pb.Tensor(name, np.ascontiguousarray(value, dtype=dtype))


def decode_text(modality: str, field: str, value: Any) -> str:
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError as e:
        raise InputError(modality, field, "UTF-8 text", f"undecodable bytes ({e.reason} at {e.start})") from None
