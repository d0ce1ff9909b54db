"""Read a request's input from a file, by extension, into the modality's input fields.

    .png .jpg .jpeg            RGB (H x W x 3 uint8; greyscale and alpha are converted)
    .tif .tiff (GeoTIFF)       MSI, SAR, HSI: bands last, or bands first when that is the short axis
    .npy                       any single-field modality (image, spectrum, points, observed)
    .npz                       fields by name (graph: series, time_of_day, day_of_week)
    .csv                       table: one row, discrete columns then continuous; trajectory: rows of x,y
    .ply .xyz .txt             point cloud (.txt is text for language/code)
    .txt .py .js .md ...       text for language and code

The registry's schema then validates what was read, so a file of the wrong kind gets the same
typed error as a bad in-memory request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..model.config import ModalityConfig
from ..model.registry import spec

IMAGE_EXT = {".png", ".jpg", ".jpeg"}
TIFF_EXT = {".tif", ".tiff"}
TEXT_MODALITIES = {"language", "code"}


def read_input(modality: str, path: str | Path, mc: ModalityConfig) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InputError(modality, "<file>", "an existing file", str(path))
    ext = path.suffix.lower()
    fields = spec(modality).schema(mc).names
    try:
        if modality in TEXT_MODALITIES:
            return {"text": path.read_text(encoding="utf-8")}
        if ext == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: (z[k].item() if z[k].ndim == 0 else z[k]) for k in z.files}
        if modality == "table" and ext == ".csv":
            return _table_csv(path, mc)
        if ext in IMAGE_EXT:
            arr = _image(path)
        elif ext in TIFF_EXT:
            arr = _tiff(path)
        elif ext == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif ext == ".ply":
            arr = _ply(path)
        elif ext in (".csv", ".xyz", ".txt"):
            arr = _numeric_text(path)
        else:
            raise InputError(modality, "<file>", "a known extension (.png .jpg .tif .npy .npz .csv .ply .xyz .txt)", ext or "none")
    except InputError:
        raise
    except Exception as e:  # unreadable or malformed file
        raise InputError(modality, "<file>", f"a readable {ext} file", f"{type(e).__name__}: {e}") from None
    if len(fields) != 1:
        raise InputError(modality, "<file>", f"a .npz with fields {list(fields)}", ext)
    if modality == "hsi":
        arr = arr.reshape(-1)  # one pixel: 1 x 1 x C or C
    return {fields[0]: arr}


def _image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _tiff(path: Path) -> np.ndarray:
    import tifffile

    arr = np.asarray(tifffile.imread(path))
    if arr.ndim == 3 and arr.shape[0] < min(arr.shape[1:]):  # (bands, H, W) -> (H, W, bands)
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 2:
        arr = arr[..., None]
    return arr.astype(np.float32)


def _numeric_text(path: Path) -> np.ndarray:
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


def _table_csv(path: Path, mc: ModalityConfig) -> dict[str, Any]:
    row = _numeric_text(path)
    if row.shape[0] != 1:
        raise InputError("table", "<file>", "a CSV with one data row (after an optional header)", f"{row.shape[0]} rows")
    n_disc = len(mc.encoder.cardinalities)
    values = row[0]
    disc = values[:n_disc]
    if not np.all(disc == np.round(disc)):
        raise InputError("table", "discrete", f"integers in the first {n_disc} columns", str(disc.tolist()))
    return {"discrete": disc.astype(np.int64), "continuous": values[n_disc:]}


_PLY_TYPES = {"char": "i1", "uchar": "u1", "short": "i2", "ushort": "u2", "int": "i4", "uint": "u4",
              "float": "f4", "double": "f8", "int8": "i1", "uint8": "u1", "int16": "i2", "uint16": "u2",
              "int32": "i4", "uint32": "u4", "float32": "f4", "float64": "f8"}


def _ply(path: Path) -> np.ndarray:
    """Vertices of an ASCII or binary PLY: x, y, z first, then any other scalar properties."""
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
    if names[:3] != ["x", "y", "z"]:
        raise ValueError(f"vertex properties must start with x, y, z; got {names}")
    if fmt == "ascii":
        rows = data[end:].decode("ascii").split("\n")[:count]
        return np.asarray([[float(v) for v in r.split()[: len(props)]] for r in rows], np.float32)
    order = "<" if fmt == "binary_little_endian" else ">"
    dt = np.dtype([(n, order + t) for n, t in props])
    v = np.frombuffer(data, dtype=dt, count=count, offset=end)
    return np.stack([v[n].astype(np.float32) for n in names], axis=1)
