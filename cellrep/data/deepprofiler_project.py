"""A DeepProfiler project's inputs → a cellrep store: images, nuclei locations, treatments.

  INPUT/metadata/index.csv     one row per site: Metadata_Plate, Metadata_Well, Metadata_Site,
                               one column per channel holding the image's path (relative to
                               INPUT/images), and any other columns (treatment, split, ...)
  INPUT/images/...             16-bit (or 8-bit) TIFF or PNG, one file per site and channel
  INPUT/locations/{Plate}/{Well}-{Site}-Nuclei.csv
                               Nuclei_Location_Center_X, Nuclei_Location_Center_Y per cell

Every site becomes one FOV (``<plate>_<well>_<site>``) whose cells are its nuclei (no
masks); the other index columns become ``Metadata_*`` columns of its cells (their name
prefixed when it is not already; True/False columns as booleans, numeric ones as numbers), and `label_column` (DeepProfiler's ``label_field``),
when set, is every cell's class.
Images are illumination-corrected per plate and channel and stretched to 8 bits per image
(`cellrep.data.illumination`, DeepProfiler's preprocessing) before they are stored.
Crops of cells near an edge are zero-padded by the crop reader, never NaN and never
dropped. A site without nuclei has no cells: it is left out with a warning.

Problems are one `InputError` naming the file: a missing index column or image, an image
of another size than its site's other channels, a locations file that is missing or lacks
its columns, a nucleus outside its image. They are all found before anything is written.
"""

from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np
import pandas as pd
from absl import logging

from cellrep.data import _ingest_io as raw
from cellrep.data import illumination as illum_lib
from cellrep.data.store import Store, StoreWriter
from cellrep.errors import BadValue, InputError

SITE = ("Metadata_Plate", "Metadata_Well", "Metadata_Site")
LOCATION_PATTERN = "{Plate}/{Well}-{Site}-Nuclei.csv"
LOCATION_COLUMNS = ("Nuclei_Location_Center_X", "Nuclei_Location_Center_Y")
_PNG = (".png",)


def read_image(path: pathlib.Path) -> np.ndarray:
  """A one-channel image [H, W] from a TIFF or PNG (8- or 16-bit), as stored."""
  if not path.is_file():
    raise InputError(path, "image not found", "the file index.csv names")
  if path.suffix.lower() in _PNG:
    from PIL import Image
    try:
      with Image.open(path) as im:
        a = np.asarray(im)
    except Exception as e:  # PIL raises many types for a damaged file
      raise InputError(path, f"unreadable PNG ({type(e).__name__}: {e})", "a PNG image") from None
  else:
    a = raw.read_array(path)
  a = a.reshape(raw.squeeze(a.shape))
  if a.ndim != 2:
    raise InputError(path, f"image of shape {a.shape}", "one channel [H, W] per file")
  return a


def _image_shape(path: pathlib.Path) -> tuple[int, ...]:
  """An image's shape from its header (pixels are read only where the header cannot say)."""
  if path.suffix.lower() not in _PNG:
    return tuple(raw.squeeze(raw.probe(path)[0]))
  from PIL import Image
  try:
    with Image.open(path) as im:  # reads the header, not the pixels
      width, height = im.size
      return (height, width) if len(im.getbands()) == 1 else tuple(read_image(path).shape)
  except Exception:
    return tuple(read_image(path).shape)  # its one-line error for a damaged file


def _read_index(path: pathlib.Path, channels: Sequence[str], label_column: str) -> pd.DataFrame:
  if not path.is_file():
    raise InputError(path, "not found", "DeepProfiler's metadata/index.csv (or set ingest.index)")
  try:
    index = pd.read_csv(path, dtype=str, keep_default_na=False)
  except Exception as e:
    raise InputError(path, f"unreadable CSV ({type(e).__name__}: {e})", "a CSV table") from None
  needed = list(SITE) + list(channels) + ([label_column] if label_column else [])
  missing = [c for c in needed if c not in index.columns]
  if missing:
    raise InputError(path, f"no column {missing[0]!r}",
                     f"columns {needed} (channels: one image path per site)")
  if index.empty:
    raise InputError(path, "no rows", "one row per site")
  dup = index.duplicated(list(SITE))
  if dup.any():
    row = index[dup].iloc[0]
    raise InputError(path, f"site {tuple(row[list(SITE)])} appears twice", "one row per site")
  keep_text = set(needed)  # site keys, image paths and the label stay as written
  for col in index.columns:
    if col not in keep_text:
      index[col] = _typed(index[col])
  return index


def _typed(values: pd.Series) -> pd.Series:
  """A metadata column as booleans or numbers when every value reads back as written
  (True/False, 3, 0.5; not an identifier such as 00123), else as text."""
  lower = values.str.strip().str.lower()
  if len(values) and lower.isin(("true", "false")).all():
    return lower == "true"
  try:
    numbers = pd.to_numeric(values)
  except (ValueError, TypeError):
    return values
  if not (numbers.astype(str) == values.str.strip()).all():
    return values
  return numbers


def _locations(path: pathlib.Path, columns: Sequence[str]) -> np.ndarray:
  """[n, 2] (y, x) float nucleus centres."""
  if not path.is_file():
    raise InputError(path, "locations file not found", "one per site with nuclei centres")
  try:
    table = pd.read_csv(path)
  except pd.errors.EmptyDataError:
    return np.zeros((0, 2))
  except Exception as e:
    raise InputError(path, f"unreadable CSV ({type(e).__name__}: {e})", "a CSV table") from None
  missing = [c for c in columns if c not in table.columns]
  if missing:
    raise InputError(path, f"no column {missing[0]!r}", f"columns {list(columns)} (x, y)")
  xy = table[list(columns)].to_numpy(np.float64)
  if not np.isfinite(xy).all():
    raise InputError(path, "a location is not a number", "pixel coordinates")
  return xy[:, ::-1]


def ingest_deepprofiler(root, out, *, channels: Sequence[str], index=None, images=None,
                        locations=None, label_column: str = "",
                        location_pattern: str = LOCATION_PATTERN,
                        location_columns: Sequence[str] = LOCATION_COLUMNS,
                        illumination: bool = True, illum_scale: float = 0.25,
                        illum_median: int = 25, illum_floor: float = 2.0,
                        stretch: Sequence[float] = (0.05, 99.95), fovs=None,
                        overwrite: bool = False, chunk_size: int = 64) -> Store:
  """Writes the store of a DeepProfiler project (module docstring); returns it."""
  root = raw.need_dir(pathlib.Path(root), "a DeepProfiler inputs folder")
  channels = list(channels)
  if not channels:
    raise BadValue("channels", "not set", "the index.csv columns of the channels, e.g. DNA,RNA,ER,AGP,Mito")
  if len(stretch) != 2 or not 0 <= stretch[0] < stretch[1] <= 100:
    raise BadValue("stretch", f"{list(stretch)}", "two percentiles low < high in [0, 100]")
  if not 0 < illum_scale <= 1:
    raise BadValue("illum_scale", f"{illum_scale}", "a fraction in (0, 1]")
  index_path = pathlib.Path(index) if index else root / "metadata" / "index.csv"
  images = pathlib.Path(images) if images else root / "images"
  locations = pathlib.Path(locations) if locations else root / "locations"
  table = _read_index(index_path, channels, label_column)
  names = [f"{r.Metadata_Plate}_{r.Metadata_Well}_{r.Metadata_Site}" for r in table.itertuples()]
  if fovs:
    wanted = raw.names(fovs)
    unknown = sorted(set(wanted) - set(names))
    if unknown:
      raise InputError(index_path, f"no site {unknown[0]!r}", f"sites named plate_well_site, e.g. {names[0]}")
    keep = np.isin(names, wanted)
    table, names = table[keep].reset_index(drop=True), [n for n, k in zip(names, keep) if k]

  # Pass 1 (headers and locations): every file present, every nucleus inside its image.
  sites = []
  for row, name in zip(table.to_dict("records"), names):
    paths = [images / row[c] for c in channels]
    shapes = set()
    for p in paths:
      if not p.is_file():
        raise InputError(p, "image not found", f"the {name} image that {index_path.name} names")
      shapes.add(_image_shape(p))
    if len(shapes) != 1:
      raise InputError(paths[0], f"site {name}: channel images of shapes {sorted(shapes)}",
                       "one size for every channel of a site")
    (shape,) = shapes
    loc = locations / location_pattern.format(
        Plate=row["Metadata_Plate"], Well=row["Metadata_Well"], Site=row["Metadata_Site"])
    yx = _locations(loc, location_columns)
    outside = ~((yx >= 0) & (yx < np.asarray(shape[:2]))).all(axis=1)
    if outside.any():
      y, x = yx[np.flatnonzero(outside)[0]]
      raise InputError(loc, f"{int(outside.sum())} nuclei outside the {shape[0]}x{shape[1]} "
                       f"image, first at x={x:g}, y={y:g}", "locations inside the image")
    if len(yx) == 0:
      logging.warning("%s: no nuclei in %s; the site is left out", name, loc)
      continue
    sites.append((name, row, paths, tuple(shape[:2]), np.floor(yx).astype(np.int64)))
  if not sites:
    raise InputError(locations, "no site has nuclei", "locations files with cells")

  # Illumination functions: the mean image of each plate and channel.
  gains = {}
  if illumination:
    means: dict[tuple[str, int], illum_lib.MeanImage] = {}
    for name, row, paths, shape, _ in sites:
      for k, p in enumerate(paths):
        mean = means.setdefault((row["Metadata_Plate"], k), illum_lib.MeanImage())
        if mean.sum is not None and mean.sum.shape != shape:
          raise InputError(p, f"image of {shape} on a plate of {mean.sum.shape} images",
                           "one image size per plate")
        mean.add(read_image(p))
    gains = {key: illum_lib.illumination_function(m.mean, illum_scale, illum_median, illum_floor)
             for key, m in means.items()}

  meta_columns = [c for c in table.columns if c not in channels]
  with StoreWriter(out, channels, [s[0] for s in sites], [s[3] for s in sites], "uint8",
                   chunk_size=chunk_size, overwrite=overwrite) as writer:
    for i, (name, row, paths, shape, yx) in enumerate(sites):
      planes = []
      for k, p in enumerate(paths):
        plane = read_image(p).astype(np.float32)
        if illumination:
          plane = plane / gains[row["Metadata_Plate"], k]
        planes.append(illum_lib.stretch_to_uint8(plane, *stretch))
      metadata = {(c if c.startswith("Metadata_") else f"Metadata_{c}"): row[c] for c in meta_columns}
      labels = {j: row[label_column] or None for j in range(1, len(yx) + 1)} if label_column else None
      writer.write_fov(i, np.stack(planes), None, labels, metadata, centres=yx)
    return writer.commit()
