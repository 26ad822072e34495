"""Raw images → a cellrep store: validated once, here, at the boundary.

Three input layouts (the third, DeepProfiler's project inputs, in
`cellrep.data.deepprofiler_project`):

* **tiff folder** (one TIFF per channel): ``FOV/TIFs/<channel>.tif[f]`` plus a
  label image ``FOV/segmentation.tiff``, either one FOV directory or a directory
  of FOV directories; optionally a labels table (CSV or parquet with columns
  ``cell_id``, ``label`` and, when there are several FOVs, ``fov``).
* **CellSighter** (Amitay et al. 2023, github.com/KerenLab/CellSighter):
  ``CellTypes/data/images/{fov}.npz|.tif|.tiff`` [H, W, K] (``data/antibodies``,
  the folder CellSighter's loader reads, is accepted too),
  ``CellTypes/cells/{fov}.npz|.tif|.tiff`` [H, W] cell ids,
  ``CellTypes/cells2labels/{fov}.npz|.txt`` (row i = integer class of cell i,
  negative = unlabelled) and ``channels.txt`` (one name per line). Arrays in npz
  files are read from the ``data`` key, as CellSighter does.

Every problem is one ``InputError`` naming the file, the problem and what was
expected. Inputs are checked in two passes: headers first (files present,
shapes, labels), so most mistakes fail in seconds before anything is written;
then pixels FOV by FOV inside a ``StoreWriter``, which leaves nothing behind
when a check fails.

Pixels keep their type when it is uint8 or uint16; other integers are stored as
uint16 when every value fits in it (found by one extra read of the pixels),
else as float32; floats are stored as float32.
"""

from __future__ import annotations

import pathlib
from typing import Mapping, Sequence

import numpy as np

from cellrep.data import _ingest_io as raw
from cellrep.data._ingest_io import Labels, read_channels_file, read_labels_table  # noqa: F401
from cellrep.data.store import Store, StoreWriter
from cellrep.errors import BadValue, InputError

FORMATS = ("tiff_folder", "cellsighter", "deepprofiler")
_TIFF = (".tif", ".tiff")


def _write(out, fovs: Sequence[str], shapes, channels, dtype, load, overwrite, chunk_size,
           classes=None) -> Store:
  """Writes FOV i from `load(i) -> (image [K, H, W], mask [H, W], labels)`; all or nothing."""
  with StoreWriter(out, channels, fovs, shapes, dtype, classes=classes, chunk_size=chunk_size,
                   overwrite=overwrite) as writer:
    for i in range(len(fovs)):
      image, mask, labels = load(i)
      writer.write_fov(i, image.astype(dtype, copy=False), mask, labels)
    return writer.commit()


# ---------------------------------------------------------------- tiff folders


def _tiff_fov_dirs(root: pathlib.Path, channel_dir: str, fovs) -> list[tuple[str, pathlib.Path]]:
  if (root / channel_dir).is_dir():
    found = [(root.resolve().name, root)]
  else:
    found = [(d.name, d) for d in sorted(root.iterdir()) if (d / channel_dir).is_dir()]
  if not found:
    raise InputError(root, f"no {channel_dir}/ folder here or in any subfolder",
                     f"a FOV folder holding {channel_dir}/<channel>.tiff, or a folder of them")
  if fovs:
    have = dict(found)
    missing = [f for f in fovs if f not in have]
    if missing:
      raise InputError(root, f"no FOV folder {missing}", f"FOVs among {sorted(have)}")
    found = [(f, have[f]) for f in fovs]
  return found


def _segmentation_file(fov_dir: pathlib.Path, name: str, template: str) -> pathlib.Path:
  try:
    path = fov_dir / template.format(fov=name)
  except (KeyError, IndexError, ValueError):
    raise InputError(template, "not a file name", "a path with at most a {fov} field") from None
  if path.is_file():
    return path
  other = path.with_suffix({".tif": ".tiff", ".tiff": ".tif"}.get(path.suffix.lower(), path.suffix))
  if other.is_file():
    return other
  raise InputError(path, "segmentation file missing", "a label image per FOV (0 = background)")


def ingest_tiff_folder(root, out, *, channel_dir: str = "TIFs",
                       segmentation: str = "segmentation.tiff",
                       channels: Sequence[str] | str | None = None, labels=None,
                       fovs: Sequence[str] | str | None = None, id_column: str = "cell_id",
                       label_column: str = "label", fov_column: str = "fov",
                       overwrite: bool = False, chunk_size: int = 64) -> Store:
  """Ingests one FOV folder, or a folder of FOV folders, of one TIFF per channel.

  Args:
    root: a FOV folder (holding `channel_dir`) or a folder of FOV folders; a
      single FOV is named after its folder.
    out: the store directory to write.
    channel_dir: the subfolder of each FOV with `<channel>.tif[f]` files [H, W].
    segmentation: the label image [H, W] (0 = background) relative to each FOV
      folder; `{fov}` is replaced by the FOV name (`../masks/{fov}_whole_cell.tiff`).
    channels: channel names to keep, in this order (list or comma-separated);
      default all channel files of the first FOV, sorted by name.
    labels: optional CSV/parquet table with `id_column` and `label_column`
      (class name; empty = unlabelled), and `fov_column` when there are several FOVs.
    fovs: FOV folder names to ingest (default all).
  """
  root = raw.need_dir(pathlib.Path(root), "a folder of per-channel TIFFs")
  plan = _tiff_fov_dirs(root, channel_dir, raw.names(fovs))
  wanted = raw.names(channels)
  explicit = wanted is not None
  files, shapes, dtypes, seg_files = [], [], [], []
  for name, fov_dir in plan:
    found = raw.by_stem(fov_dir / channel_dir, _TIFF)
    if not found:
      raise InputError(fov_dir / channel_dir, "no .tif/.tiff files", "one TIFF per channel")
    if wanted is None:
      wanted = sorted(found, key=lambda s: (s.lower(), s))
    elif not explicit and set(found) != set(wanted):
      raise InputError(fov_dir / channel_dir,
                       f"channels differ from FOV {plan[0][0]!r}: extra "
                       f"{sorted(set(found) - set(wanted))}, missing {sorted(set(wanted) - set(found))}",
                       "the same channel files in every FOV, or a `channels` list")
    for c in wanted:
      if c not in found:
        raise InputError(fov_dir / channel_dir / f"{c}.tiff", "missing channel file",
                         f"a .tif/.tiff file for each channel of {wanted}")
    seg = _segmentation_file(fov_dir, name, segmentation)
    seg_shape = raw.squeeze(raw.probe(seg)[0])
    first = None
    for c in wanted:
      shape, dtype = raw.probe(found[c])
      shape = raw.squeeze(shape)
      if len(shape) != 2:
        raise InputError(found[c], f"image of shape {shape}", "one 2-D image [height, width] per file")
      if first is not None and shape != first[1]:
        raise InputError(found[c], f"shape {shape} differs from {first[0].name} {first[1]}",
                         "all channels of a FOV the same shape")
      first = first or (found[c], shape)
      dtypes.append(dtype)
    if seg_shape != first[1]:
      raise InputError(seg, f"segmentation shape {seg_shape} differs from the image "
                       f"shape {first[1]} of {first[0].name}", "the channel images' shape")
    files.append([found[c] for c in wanted])
    shapes.append(first[1])
    seg_files.append(seg)
  names = [n for n, _ in plan]
  table = (raw.read_labels_table(labels, names, id_column=id_column, label_column=label_column,
                             fov_column=fov_column) if labels is not None else None)
  dtype = raw.choose_dtype(dtypes, raw.value_range(
      lambda: (raw.read_array(f) for fov_files in files for f in fov_files)))

  def load(i):
    mask = raw.as_mask(raw.read_array(seg_files[i]), seg_files[i])
    image = np.empty((len(wanted), *shapes[i]), dtype)
    for k, f in enumerate(files[i]):
      a = raw.read_array(f)
      a = a.reshape(raw.squeeze(a.shape))
      if a.shape != shapes[i]:  # a header that lied
        raise InputError(f, f"pixels of shape {a.shape}", f"{shapes[i]} as its header says")
      raw.check_finite(a, f, "y, x")
      image[k] = a
    fov_labels = raw.check_labels_in_mask(table[names[i]], mask, labels) if table else None
    return image, mask, fov_labels

  return _write(out, names, shapes, wanted, dtype, load, overwrite, chunk_size)


# ---------------------------------------------------------------- CellSighter


def _cellsighter_labels(classes_of: np.ndarray, mask: np.ndarray, path, class_names) -> Labels:
  """{cell id: class name or None} for every cell of `mask`; classes_of[i] = class of cell i."""
  ids = np.unique(mask)
  ids = ids[ids != 0]
  if len(classes_of) <= ids[-1]:
    raise InputError(path, f"{len(classes_of)} rows but the segmentation has cell id {int(ids[-1])}",
                     "row i = class of cell i (row 0 = background), -1 for unlabelled cells")
  labelled = np.flatnonzero(classes_of >= 0)
  raw.check_labels_in_mask(dict.fromkeys(labelled[labelled != 0].tolist()), mask, path)
  name = (lambda c: class_names[c]) if class_names is not None else str
  return {int(i): name(int(classes_of[i])) if classes_of[i] >= 0 else None for i in ids}


def _cellsighter_classes(class_lists: Sequence[np.ndarray], paths, class_names) -> list[str]:
  """The store's classes: `class_names`, or the ids in use in numeric order ("2" before "10")."""
  used = [np.unique(v[1:][v[1:] >= 0]) for v in class_lists]  # row 0 is the background
  if class_names is None:
    return [str(c) for c in np.unique(np.concatenate(used))]
  for u, path in zip(used, paths):
    if u.size and u[-1] >= len(class_names):
      raise InputError(path, f"class id {int(u[-1])} but {len(class_names)} class names",
                       f"class ids below {len(class_names)}")
  return list(class_names)


def _one_file(folder: pathlib.Path, fov: str, suffixes, what: str) -> pathlib.Path:
  found = [folder / f"{fov}{s}" for s in suffixes if (folder / f"{fov}{s}").is_file()]
  if not found:
    raise InputError(folder / f"{fov}{suffixes[0]}", f"{what} file missing",
                     f"{fov}{'|'.join(suffixes)} for each image")
  if len(found) > 1:
    raise InputError(folder, f"several {what} files for {fov!r}: {[p.name for p in found]}", "one")
  return found[0]


def ingest_cellsighter(root, out, *, class_names: Sequence[str] | str | None = None,
                       channels_file=None, blacklist: Sequence[str] | str | None = None,
                       fovs: Sequence[str] | str | None = None, overwrite: bool = False,
                       chunk_size: int = 64) -> Store:
  """Ingests a CellSighter data folder (the `root_dir` of a CellSighter config).

  Args:
    root: the folder holding `CellTypes/` and `channels.txt`.
    out: the store directory to write.
    class_names: name of each integer class id (list or comma-separated); by
      default a class is named by its id ("0", "1", ...), as in `hierarchy_match`.
    channels_file: the channel list (default `root/channels.txt`), one name per
      line in the order of the images' last axis.
    blacklist: channels to leave out, as CellSighter's `blacklist`.
    fovs: image ids to ingest (default every image in `CellTypes/data/images`).
  """
  root = raw.need_dir(pathlib.Path(root), "a CellSighter data folder holding CellTypes/")
  cell_types = raw.need_dir(root / "CellTypes", "CellTypes/{data/images,cells,cells2labels}/")
  images_dir = cell_types / "data" / "images"
  if not images_dir.is_dir() and (cell_types / "data" / "antibodies").is_dir():
    images_dir = cell_types / "data" / "antibodies"
  raw.need_dir(images_dir, "one .npz/.tif/.tiff image [H, W, channels] per FOV")
  cells_dir = raw.need_dir(cell_types / "cells", "one label image per FOV")
  c2l_dir = raw.need_dir(cell_types / "cells2labels", "one .npz/.txt class list per FOV")
  channels_file = pathlib.Path(channels_file) if channels_file else root / "channels.txt"
  channels = raw.read_channels_file(channels_file)
  dropped = raw.names(blacklist) or []
  unknown = sorted(set(dropped) - set(channels))
  if unknown:
    raise InputError(channels_file, f"blacklisted channels {unknown} are not listed",
                     f"names among {channels}")
  keep = [k for k, c in enumerate(channels) if c not in dropped]
  class_names = raw.names(class_names)
  images = raw.by_stem(images_dir, (".npz",) + _TIFF)
  names = raw.names(fovs) or sorted(images)
  if not names:
    raise InputError(images_dir, "no .npz/.tif/.tiff images", "one image [H, W, channels] per FOV")
  shapes, dtypes, plan, class_lists = [], [], [], []
  for name in names:
    if name not in images:
      raise InputError(images_dir / f"{name}.npz", "image file missing",
                       f"an image among {sorted(images)}")
    cells = _one_file(cells_dir, name, (".npz",) + _TIFF, "segmentation")
    c2l = _one_file(c2l_dir, name, (".npz", ".txt"), "cells2labels")
    shape, dtype = raw.probe(images[name])
    seg_shape = raw.squeeze(raw.probe(cells)[0])
    if len(seg_shape) != 2:
      raise InputError(cells, f"segmentation has shape {seg_shape}", "a 2-D label image [height, width]")
    if len(shape) == 2 and len(channels) == 1:
      shape = (*shape, 1)
    # Channels last as CellSighter reads them; channels first is accepted when
    # the segmentation's shape makes the layout unambiguous.
    if len(shape) == 3 and shape[:2] == seg_shape and shape[2] == len(channels):
      last = True
    elif len(shape) == 3 and shape[1:] == seg_shape and shape[0] == len(channels):
      last = False
    elif len(shape) == 3 and seg_shape in (shape[:2], shape[1:]):
      raise InputError(images[name], f"{shape[2] if shape[:2] == seg_shape else shape[0]} channels in "
                       f"an image of shape {shape}", f"{len(channels)}, one per line of {channels_file}")
    else:
      raise InputError(cells, f"segmentation shape {seg_shape} differs from the image shape "
                       f"{shape} of {images[name].name}", "[H, W] of an image [H, W, channels]")
    shapes.append(seg_shape)
    dtypes.append(dtype)
    plan.append((images[name], cells, c2l, last))
    class_lists.append(raw.read_cells2labels(c2l))  # small: one number per cell
  classes = _cellsighter_classes(class_lists, [p[2] for p in plan], class_names)

  def image_of(i) -> np.ndarray:
    path, _, _, last = plan[i]
    a = raw.read_array(path)
    a = a[..., None] if a.ndim == 2 else a  # one channel saved as [H, W]
    a = np.moveaxis(a, -1, 0) if last else a
    if a.shape != (len(channels), *shapes[i]):
      raise InputError(path, f"pixels of shape {a.shape}", "the shape its header says")
    return a[keep]

  dtype = raw.choose_dtype(dtypes, raw.value_range(lambda: (image_of(i) for i in range(len(plan)))))

  def load(i):
    image = image_of(i)
    raw.check_finite(image, plan[i][0], "channel, y, x")
    mask = raw.as_mask(raw.read_array(plan[i][1]), plan[i][1])
    labels = _cellsighter_labels(class_lists[i], mask, plan[i][2], class_names)
    return image, mask, labels

  return _write(out, names, shapes, [channels[k] for k in keep], dtype, load, overwrite,
                chunk_size, classes=classes)


# ---------------------------------------------------------------- config entry


def ingest(cfg: Mapping, out=None) -> Store:
  """Runs the ingest a config describes (see configs/ingest.py); `out` overrides `cfg.output`."""
  get = lambda key, default=None: cfg.get(key, default)  # noqa: E731
  fmt = get("format", "tiff_folder")
  if fmt not in FORMATS:
    raise BadValue("format", f"{fmt!r} is not a known format", f"one of {list(FORMATS)}")
  if not get("input"):
    raise BadValue("input", "not set", "the folder to ingest (--config.ingest.input=DIR)")
  out = out or get("output")
  if not out:
    raise BadValue("output", "not set", "the store directory to write")
  common = dict(fovs=get("fovs"), overwrite=bool(get("overwrite", False)),
                chunk_size=int(get("chunk_size", 64)))
  if fmt == "deepprofiler":
    from cellrep.data import deepprofiler_project as dp
    try:
      stretch = [float(v) for v in raw.names(get("stretch", "0.05,99.95")) or []]
    except ValueError:
      raise BadValue("stretch", f"{get('stretch')!r}", "two percentiles, e.g. 0.05,99.95") from None
    return dp.ingest_deepprofiler(
        get("input"), out, channels=raw.names(get("channels")) or [], index=get("index"),
        images=get("images"), locations=get("locations"), label_column=get("label_field", ""),
        location_pattern=get("location_pattern", dp.LOCATION_PATTERN),
        location_columns=raw.names(get("location_columns", dp.LOCATION_COLUMNS)),
        illumination=bool(get("illumination", True)), illum_scale=float(get("illum_scale", 0.25)),
        illum_median=int(get("illum_median", 25)), illum_floor=float(get("illum_floor", 2.0)),
        stretch=stretch, **common)
  if fmt == "cellsighter":
    return ingest_cellsighter(get("input"), out, class_names=get("class_names"),
                              channels_file=get("channels_file"), blacklist=get("blacklist"),
                              **common)
  return ingest_tiff_folder(
      get("input"), out, channel_dir=get("channel_dir", "TIFs"),
      segmentation=get("segmentation", "segmentation.tiff"), channels=get("channels"),
      labels=get("labels") or None, id_column=get("id_column", "cell_id"),
      label_column=get("label_column", "label"), fov_column=get("fov_column", "fov"), **common)
