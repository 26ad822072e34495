"""Reading and checking raw input files for `cellrep.data.ingest`.

Each function refuses bad input with one `InputError` naming the file, the
problem and what was expected; nothing here writes.
"""

from __future__ import annotations

import logging
import pathlib
import zipfile
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import tifffile

from cellrep.config_util import comma_list
from cellrep.errors import InputError

Labels = dict[int, "str | None"]


def read_npz(path: pathlib.Path) -> np.ndarray:
  """The array under key `data` (CellSighter's key), or the only array of the file."""
  try:
    with open(path, "rb") as f:
      head = f.read(6)
    if head == b"\x93NUMPY":  # an .npy saved under an .npz name
      return np.load(path, allow_pickle=False)
    if not head.startswith(b"PK"):
      raise InputError(path, "not an npz file (no zip header)", "a numpy .npz file")
    with np.load(path, allow_pickle=False) as z:
      key = "data" if "data" in z.files else (z.files[0] if len(z.files) == 1 else None)
      if key is None:
        raise InputError(path, f"no 'data' array among {z.files}", "the array under key 'data'")
      try:
        return z[key]
      except ValueError:
        # An object array: CellSighter loads these with allow_pickle=True, so for
        # the user's own files we do too, and insist on numbers inside.
        with np.load(path, allow_pickle=True) as zp:
          return np.asarray(zp[key].tolist())
  except InputError:
    raise
  except Exception as e:  # zip, pickle and format errors all mean the same to a user
    raise InputError(path, f"unreadable npz ({type(e).__name__}: {e})", "a numpy .npz file") from None


def read_array(path: pathlib.Path) -> np.ndarray:
  """Pixels of an .npz or a TIFF (.tif/.tiff/.ome.tif), as stored."""
  if path.suffix.lower() == ".npz":
    return read_npz(path)
  tiff_log = logging.getLogger("tifffile")
  level = tiff_log.level
  tiff_log.setLevel(logging.CRITICAL)  # its warnings about a damaged file: our one line says it
  try:
    a = tifffile.imread(path)
  except Exception as e:  # tifffile raises many types for a damaged file
    raise InputError(path, f"truncated or corrupt TIFF ({type(e).__name__}: {e})",
                     "a complete TIFF image") from None
  finally:
    tiff_log.setLevel(level)
  if a.size == 0 or a.ndim < 2:  # a header without an image: what a cut file can read as
    raise InputError(path, f"truncated or corrupt TIFF (no image in it, shape {a.shape})",
                     "a complete TIFF image")
  return a


def probe(path: pathlib.Path) -> tuple[tuple[int, ...], np.dtype]:
  """Shape and dtype from the file header, without reading pixels when possible."""
  try:
    if path.suffix.lower() != ".npz":
      with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        return tuple(series.shape), np.dtype(series.dtype)
    with zipfile.ZipFile(path) as z:
      names = [n for n in z.namelist() if n.endswith(".npy")]
      name = "data.npy" if "data.npy" in names else (names[0] if len(names) == 1 else None)
      if name is not None:
        with z.open(name) as f:
          version = np.lib.format.read_magic(f)
          read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)
          shape, _, dtype = read(f)
          if dtype != object:
            return tuple(shape), np.dtype(dtype)
  except Exception:
    pass  # fall through: a full read gives the precise error or the answer
  a = read_array(path)
  return a.shape, a.dtype


def squeeze(shape: Sequence[int]) -> tuple[int, ...]:
  """`shape` without length-1 axes when it has more than two ([1, H, W] -> [H, W])."""
  return tuple(s for s in shape if s != 1) if len(shape) > 2 else tuple(shape)


def as_mask(a: np.ndarray, path) -> np.ndarray:
  """A label image [H, W] int32, or an InputError saying why it is not one."""
  a = a.reshape(squeeze(a.shape))
  if a.ndim != 2:
    raise InputError(path, f"segmentation has shape {a.shape}", "a 2-D label image [height, width]")
  if a.dtype.kind == "f":
    if not np.isfinite(a).all() or (a != np.round(a)).any():
      raise InputError(path, "segmentation has non-integer values", "integer cell ids")
  elif a.dtype.kind not in "iub":
    raise InputError(path, f"segmentation of type {a.dtype}", "integer cell ids")
  if a.size and a.min() < 0:
    raise InputError(path, f"negative cell id {int(a.min())}", "0 for background, positive cell ids")
  if not a.any():
    raise InputError(path, "segmentation has no cells (all background)", "at least one non-zero cell id")
  if a.max() > np.iinfo(np.int32).max:
    raise InputError(path, f"cell id {int(a.max())} does not fit int32", "cell ids below 2**31")
  return a.astype(np.int32, copy=False)


def check_finite(a: np.ndarray, path, axes: str) -> None:
  if a.dtype.kind in "fc" and not np.isfinite(a).all():
    bad = ~np.isfinite(a)
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    raise InputError(path, f"{int(bad.sum())} NaN/Inf pixels (first at [{axes}] = {where})",
                     "finite pixel values")


def choose_dtype(dtypes: Sequence[np.dtype], value_range: Callable[[], tuple[float, float]]):
  """The store's pixel type for inputs of `dtypes` (see the `ingest` module docstring)."""
  dtype = np.result_type(*dtypes)
  if dtype in (np.uint8, np.uint16):
    return dtype
  if dtype == np.bool_:
    return np.dtype(np.uint8)
  if dtype.kind in "iu":
    lo, hi = value_range()
    return np.dtype(np.uint16 if lo >= 0 and hi <= 65535 else np.float32)
  if dtype.kind == "f":
    return np.dtype(np.float32)
  raise InputError(", ".join(sorted({str(d) for d in dtypes})), f"pixel type {dtype}",
                   "integer or floating-point pixels")


def check_labels_in_mask(labels: Labels, mask: np.ndarray, path) -> Labels:
  """`labels` unchanged when every id in it is a cell of `mask`; `path` names the labels' file."""
  present = np.unique(mask)
  absent = sorted(set(labels) - set(present[present != 0].tolist()))
  if absent:
    raise InputError(path, f"labels for {len(absent)} cell ids absent from the segmentation: "
                     f"{absent[:10]}{' ...' if len(absent) > 10 else ''}", "ids present in the mask")
  return labels


def value_range(arrays: Callable[[], Iterable[np.ndarray]]) -> Callable[[], tuple[float, float]]:
  """A deferred (min, max) over `arrays()`: only `choose_dtype` decides whether it is worth a read."""
  def scan():
    lo, hi = np.inf, -np.inf
    for a in arrays():
      if a.size:
        lo, hi = min(lo, float(a.min())), max(hi, float(a.max()))
    return lo, hi
  return scan


def names(value) -> list[str] | None:
  """A list of names from a comma-separated string or a sequence; None when empty."""
  if value is None:
    return None
  if isinstance(value, str):
    return comma_list(value) or None
  return [str(v).strip() for v in value if str(v).strip()] or None


def by_stem(folder: pathlib.Path, suffixes: Sequence[str]) -> dict[str, pathlib.Path]:
  """{file stem: path} of `folder`'s files with one of `suffixes` (any case)."""
  found: dict[str, pathlib.Path] = {}
  for p in sorted(folder.iterdir()):
    if p.name.startswith(".") or not p.is_file() or p.suffix.lower() not in suffixes:
      continue
    stem = p.name[:-len(p.suffix)]
    if stem in found:
      raise InputError(folder, f"two files for {stem!r}: {found[stem].name}, {p.name}", "one file each")
    found[stem] = p
  return found


def need_dir(path: pathlib.Path, expected: str) -> pathlib.Path:
  if not path.is_dir():
    raise InputError(path, "missing" if not path.exists() else "not a directory", expected)
  return path


def _label_value(v) -> str | None:
  if v is None or (not isinstance(v, str) and pd.isna(v)):
    return None
  if isinstance(v, (float, np.floating)) and float(v).is_integer():
    v = int(v)
  v = str(v).strip()
  return v or None


def read_labels_table(path, fovs: Sequence[str], *, id_column="cell_id", label_column="label",
                      fov_column="fov") -> dict[str, Labels]:
  """{fov name: {cell id: class name or None}} from a CSV/TSV/parquet table."""
  path = pathlib.Path(path)
  suffix = path.suffix.lower()
  if not path.is_file():
    raise InputError(path, "labels table missing", "a CSV or parquet file")
  try:
    if suffix in (".parquet", ".pq"):
      table = pd.read_parquet(path)
    elif suffix in (".csv", ".tsv", ".txt"):
      table = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
    else:
      raise InputError(path, f"unknown table type {suffix!r}", ".csv, .tsv or .parquet")
  except InputError:
    raise
  except Exception as e:
    raise InputError(path, f"unreadable table ({type(e).__name__}: {e})", "a CSV or parquet file") from None
  need = [id_column, label_column] + ([fov_column] if len(fovs) > 1 else [])
  missing = [c for c in need if c not in table.columns]
  if missing:
    raise InputError(path, f"no column {missing} (columns: {list(table.columns)})",
                     f"columns {need}" + ("" if len(fovs) > 1 else f", and {fov_column!r} optionally"))
  ids = pd.to_numeric(table[id_column], errors="coerce")
  if ids.isna().any() or (ids != np.round(ids)).any() or (ids <= 0).any():
    row = int(np.flatnonzero(ids.isna() | (ids != np.round(ids)) | (ids <= 0))[0])
    raise InputError(path, f"column {id_column!r} row {row}: {table[id_column].iloc[row]!r}",
                     "positive integer cell ids")
  if fov_column in table.columns:
    fov = table[fov_column].astype(str).str.strip()
    unknown = sorted(set(fov) - set(fovs))
    if unknown:
      raise InputError(path, f"column {fov_column!r} names FOVs not ingested: {unknown[:10]}",
                       f"FOV names among {list(fovs)[:10]}")
  else:
    fov = pd.Series(fovs[0], index=table.index)
  out: dict[str, Labels] = {name: {} for name in fovs}
  for name, i, v in zip(fov, ids.astype(np.int64), table[label_column]):
    if int(i) in out[name]:
      raise InputError(path, f"cell id {int(i)} of FOV {name!r} appears twice", "one row per cell")
    out[name][int(i)] = _label_value(v)
  return out


def read_channels_file(path) -> list[str]:
  """Channel names, one per line, as CellSighter's `read_channels` reads them."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise InputError(path, "channels file missing", "a text file, one channel name per line")
  try:
    lines = path.read_text().strip().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise InputError(path, f"unreadable ({type(e).__name__}: {e})",
                     "a text file, one channel name per line") from None
  channels = [line.strip() for line in lines]
  if not channels or "" in channels:
    where = f"line {channels.index('') + 1} is empty" if channels else "no channel names"
    raise InputError(path, where, "one channel name per line")
  return channels


def read_cells2labels(path: pathlib.Path) -> np.ndarray:
  """[rows] int64 class ids, row i = cell i, negative = unlabelled (CellSighter's cells2labels)."""
  if path.suffix.lower() == ".txt":
    try:  # as CellSighter: numbers may be written as floats ("3.0")
      values = np.array(path.read_text().strip().split(), dtype=float)
    except (OSError, ValueError, UnicodeDecodeError) as e:
      raise InputError(path, f"unreadable ({type(e).__name__}: {e})",
                       "one integer class per line") from None
  else:
    values = np.asarray(read_npz(path)).reshape(-1)
  if values.dtype.kind not in "iuf" or (values.dtype.kind == "f" and (
      ~np.isfinite(values) | (values != np.round(values))).any()):
    raise InputError(path, "non-integer class ids", "one integer class id per cell, -1 = unlabelled")
  return values.astype(np.int64)
