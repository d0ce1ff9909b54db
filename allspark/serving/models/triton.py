"""Helpers shared by the python models: the backend's utils module, parameters, output dtypes from
the config, and error responses that fail one request without failing its batch."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import numpy as np

from ...errors import AllSparkError, DeadlineExceeded, InputError, UnknownModalityError


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


def request_id(request) -> str:
    """The id the client gave the request ("" if none); Triton echoes it on the response."""
    try:
        return request.request_id() or ""
    except Exception:
        return ""


def error_response(err: BaseException, request=None, tagged: bool = False):
    """An error response for one request: InputError-like errors are the caller's (INVALID_ARG,
    HTTP 400), a timeout is UNAVAILABLE, anything else is ours (INTERNAL, with the exception type
    named). The request's id, when it has one, leads the message, so logs and clients can match.
    `tagged`: the code also leads the message (`[INVALID_ARG] ...`), for a response that travels
    back through BLS, which keeps an error's message but not its code (`untag` restores it)."""
    pb = pb_utils()
    rid = request_id(request) if request is not None else ""
    lead = f"request {rid}: " if rid else ""
    if isinstance(err, (InputError, UnknownModalityError)):
        code, msg = pb.TritonError.INVALID_ARG, lead + str(err)
    elif isinstance(err, TimeoutError):
        code, msg = pb.TritonError.UNAVAILABLE, lead + str(err)
    else:
        code, msg = pb.TritonError.INTERNAL, lead + (str(err) if isinstance(err, AllSparkError) else f"{type(err).__name__}: {err}")
    return pb.InferenceResponse(error=pb.TritonError(f"[{code.name}] {msg}" if tagged else msg, code))


_TAG = re.compile(r"^\[([A-Z_]+)\] ")


def untag(error):
    """A BLS response's error with the code `error_response(tagged=True)` put in its message."""
    pb = pb_utils()
    msg = error.message()
    m = _TAG.match(msg)
    code = getattr(pb.TritonError, m.group(1), None) if m else None
    return pb.TritonError(msg[m.end():], code) if code is not None else pb.TritonError(msg, pb.TritonError.INTERNAL)


DEADLINE_PARAM = "deadline_unix_ns"


def time_left_s(request) -> float | None:
    """Seconds until the request's deadline (request parameter `deadline_unix_ns`, wall clock), or
    None without one. A parameter, not Triton's `timeout`: an ensemble does not hand the timeout on
    to the model behind it (measured: requests with a 1 us timeout were all served), while request
    parameters pass through; and an absolute deadline also counts the time queued before `execute`."""
    v = request_parameters(request).get(DEADLINE_PARAM)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise InputError("<request>", DEADLINE_PARAM, "a positive integer (ns since the Unix epoch)", repr(v))
    return (v - time.time_ns()) / 1e9


def check_deadline(request, what: str) -> float | None:
    """`time_left_s`, raising DeadlineExceeded once it has passed."""
    left = time_left_s(request)
    if left is not None and left <= 0:
        raise DeadlineExceeded(f"{what}: the request's deadline passed {-1e3 * left:.1f} ms before it could run")
    return left


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
