"""Read a request's input from a file into the modality's input fields (`allspark run`, `allspark client`).

    .png .jpg .jpeg            images (H x W x 3 uint8; greyscale and alpha are converted)
    .tif .tiff (GeoTIFF)       rasters: bands last, or bands first when that is the short axis
    .npy                       any single-field modality (image, spectrum, points, observed)
    .npz                       fields by name (graph: series, time_of_day, day_of_week)
    .csv .xyz .txt             numeric rows (trajectory: x,y per row; point clouds)
    .ply                       point cloud vertices (ASCII or binary)

A modality with its own reader (`ModalitySpec.read`: text, table CSV, an HSI pixel) uses it; every
other one uses these by extension. The registry's schema then validates what was read, so a file
of the wrong kind gets the same typed error as a bad in-memory request.

Hostile files are refused before they are decoded: every format's header (image size, TIFF pages,
.npy/.npz array headers, PLY vertex count) or the file size is checked against `max_input_bytes()`
(1 GiB of decoded data; `ALLSPARK_MAX_INPUT_BYTES` to change), so a small file declaring a huge
raster (a decompression bomb) never gets allocated.
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..model.config import ModalityConfig
from ..model.registry import spec

IMAGE_EXT = {".png", ".jpg", ".jpeg"}
TIFF_EXT = {".tif", ".tiff"}
KNOWN_EXT = ".png .jpg .tif .npy .npz .csv .ply .xyz .txt"
DEFAULT_MAX_INPUT_BYTES = 1 << 30


def max_input_bytes() -> int:
    try:
        return max(1, int(os.environ.get("ALLSPARK_MAX_INPUT_BYTES", DEFAULT_MAX_INPUT_BYTES)))
    except ValueError:
        return DEFAULT_MAX_INPUT_BYTES


def check_size(what: str, shape: tuple[int, ...], itemsize: int) -> None:
    """Refuse (before decoding) data that would take more than `max_input_bytes()`."""
    n = math.prod(int(d) for d in shape) * itemsize
    if n > max_input_bytes():
        raise InputError("<file>", "<file>", f"at most {max_input_bytes() / 2 ** 20:.0f} MiB of data once decoded "
                         "(ALLSPARK_MAX_INPUT_BYTES)", f"{what} declaring {list(shape)} ({n / 2 ** 20:.0f} MiB)")


def check_file_size(path: Path, limit: int | None = None) -> None:
    limit = max_input_bytes() if limit is None else limit
    size = path.stat().st_size
    if size > limit:
        raise InputError("<file>", "<file>", f"a file of at most {limit / 2 ** 20:.0f} MiB", f"{size / 2 ** 20:.0f} MiB")


def read_input(modality: str, path: str | Path, mc: ModalityConfig) -> dict[str, Any]:
    path = Path(path)
    s = spec(modality)
    if not path.is_file():
        raise InputError(s.name, "<file>", "an existing file", str(path))
    if s.file_types and path.suffix.lower() not in s.file_types:  # before decoding it as something it is not
        raise InputError(s.name, "<file>", f"one of {' '.join(s.file_types)} (the file types {s.name} takes)",
                         f"a {path.suffix.lower() or 'extensionless'} file")
    try:
        return s.read(path, mc) if s.read is not None else read_fields(path, s.schema(mc).names)
    except InputError as e:
        if e.modality == "<file>":  # raised below without knowing the modality
            raise InputError(s.name, e.field, e.expected, e.actual) from None
        raise
    except Exception as e:  # unreadable or malformed file
        raise InputError(s.name, "<file>", f"a readable {path.suffix.lower()} file", f"{type(e).__name__}: {e}") from None


def read_fields(path: Path, fields: tuple[str, ...]) -> dict[str, Any]:
    """A .npz's fields by name, or one array for a modality with a single field."""
    if path.suffix.lower() == ".npz":
        _check_npz(path)
        with np.load(path, allow_pickle=False) as z:
            return {k: (z[k].item() if z[k].ndim == 0 else z[k]) for k in z.files}
    if len(fields) != 1:
        raise InputError("<file>", "<file>", f"a .npz with fields {list(fields)}", path.suffix.lower())
    return {fields[0]: read_array(path)}


def read_array(path: Path) -> np.ndarray:
    ext = path.suffix.lower()
    if ext in IMAGE_EXT:
        return _image(path)
    if ext in TIFF_EXT:
        return _tiff(path)
    if ext == ".npy":
        with open(path, "rb") as f:
            _check_npy_header(f, path.name)
        return np.load(path, allow_pickle=False)
    if ext == ".ply":
        return _ply(path)
    if ext in (".csv", ".xyz", ".txt"):
        check_file_size(path)
        return numeric_text(path)
    raise InputError("<file>", "<file>", f"a known extension ({KNOWN_EXT})", ext or "none")


def _check_npy_header(f, what: str) -> None:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    check_size(what, shape, dtype.itemsize)


def _check_npz(path: Path) -> None:
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            with z.open(info) as f:
                _check_npy_header(f, f"{path.name}:{info.filename}")


def _image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:  # reads the header only
        check_size(f"a {im.format} image", (im.size[1], im.size[0], 3), 1)
        return np.asarray(im.convert("RGB"))


def _tiff(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:  # the header, not the pixels
        series = tif.series[0]
        check_size("a TIFF", tuple(series.shape), max(np.dtype(series.dtype).itemsize, 4))  # decoded as float32
        arr = np.asarray(series.asarray())
    if arr.ndim == 3 and arr.shape[0] < min(arr.shape[1:]):  # (bands, H, W) -> (H, W, bands)
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 2:
        arr = arr[..., None]
    return arr.astype(np.float32)


def numeric_text(path: Path) -> np.ndarray:
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    delim = "," if "," in lines[0] else None
    rows = []
    for ln in lines:
        try:
            rows.append([float(x) for x in ln.replace(",", " ").split()] if delim else [float(x) for x in ln.split()])
        except ValueError:
            if rows:  # only a header may be non-numeric
                raise
    return np.asarray(rows, dtype=np.float32)


_PLY_TYPES = {"char": "i1", "uchar": "u1", "short": "i2", "ushort": "u2", "int": "i4", "uint": "u4",
              "float": "f4", "double": "f8", "int8": "i1", "uint8": "u1", "int16": "i2", "uint16": "u2",
              "int32": "i4", "uint32": "u4", "float32": "f4", "float64": "f8"}


def _ply(path: Path) -> np.ndarray:
    """Vertices of an ASCII or binary PLY: x, y, z first, then any other scalar properties."""
    check_file_size(path)
    data = path.read_bytes()
    end = data.index(b"end_header") + len(b"end_header")
    end = data.index(b"\n", end) + 1
    header = data[:end].decode("ascii").splitlines()
    fmt, count, props, in_vertex = "", 0, [], False
    for line in header:
        parts = line.split()
        if parts[:1] == ["format"]:
            fmt = parts[1]
        elif parts[:1] == ["element"]:
            in_vertex = parts[1] == "vertex"
            count = int(parts[2]) if in_vertex else count
        elif parts[:1] == ["property"] and in_vertex:
            if parts[1] == "list":
                raise ValueError("list properties on vertices are not supported")
            props.append((parts[2], _PLY_TYPES[parts[1]]))
    names = [p for p, _ in props]
    check_size("a PLY", (count, len(props)), 4)
    if names[:3] != ["x", "y", "z"]:
        raise ValueError(f"vertex properties must start with x, y, z; got {names}")
    if fmt == "ascii":
        rows = data[end:].decode("ascii").split("\n")[:count]
        return np.asarray([[float(v) for v in r.split()[: len(props)]] for r in rows], np.float32)
    order = "<" if fmt == "binary_little_endian" else ">"
    dt = np.dtype([(n, order + t) for n, t in props])
    v = np.frombuffer(data, dtype=dt, count=count, offset=end)
    return np.stack([v[n].astype(np.float32) for n in names], axis=1)
