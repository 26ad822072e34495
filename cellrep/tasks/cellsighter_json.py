"""CellSighter's `config.json` as cellrep config values, so a CellSighter experiment runs as it is.

CellSighter (KerenLab/CellSighter, train.py) reads from its config.json:

  root_dir, channels_path   the data folder (CellTypes/...) and the channel list
  train_set, val_set        image ids to train on and to validate on (may overlap)
  crop_size, crop_input_size  read window and network input, px (input defaults to 100)
  num_classes               class ids 0 .. num_classes - 1
  epoch_max, lr             epochs and Adam's learning rate (decayed x0.85 per epoch)
  blacklist                 channels left out
  sample_batch, hierarchy_match  balanced sampling, per class or per coarse category
  size_data                 at most this many training cells per class
  aug                       augmentations on or off

Its batch size is fixed at 128 in code; a `batch_size` key, when present, is
used. `weight_to_eval` and other keys are ignored (logged). Relative paths are
tried as given (CellSighter resolves them from where it runs), then relative to
the config file's folder, then that folder itself when it holds CellTypes/.
"""

from __future__ import annotations

import pathlib

from absl import logging

from cellrep.errors import InputError
from cellrep.files import read_json

_USED = {"root_dir", "channels_path", "train_set", "val_set", "crop_size", "crop_input_size",
         "num_classes", "epoch_max", "lr", "blacklist", "sample_batch", "hierarchy_match",
         "size_data", "aug", "batch_size"}


def _find(value: str, base: pathlib.Path, want_dir: bool) -> pathlib.Path | None:
  path = pathlib.Path(value)
  candidates = [path] if path.is_absolute() else [path, base / path]
  if want_dir:
    candidates.append(base)
  for c in candidates:
    if (want_dir and (c / "CellTypes").is_dir()) or (not want_dir and c.is_file()):
      return c.resolve()
  return None


def _names(values, path, key) -> str:
  if not isinstance(values, list) or not all(isinstance(v, (str, int)) for v in values):
    raise InputError(path, f"{key} is {values!r}", "a list of names")
  return ",".join(str(v) for v in values)


def read(path) -> dict:
  path = pathlib.Path(path)
  cs = read_json(path, "a CellSighter config.json")
  if not isinstance(cs, dict):
    raise InputError(path, "not a JSON object", "CellSighter's config.json")
  for key in ("root_dir", "train_set", "val_set"):
    if key not in cs:
      raise InputError(path, f"no {key!r}",
                       "CellSighter's config.json keys (root_dir, train_set, val_set, ...)")
  ignored = sorted(set(cs) - _USED)
  if ignored:
    logging.info("%s: ignoring CellSighter keys %s", path, ignored)
  return cs


def apply(config, path) -> None:
  """Sets `config` (a classify/cellsighter config) from the CellSighter config.json at `path`."""
  path = pathlib.Path(path)
  cs = read(path)
  base = path.resolve().parent
  root = _find(str(cs["root_dir"]), base, want_dir=True)
  if root is None:
    raise InputError(path, f"root_dir {cs['root_dir']!r} holds no CellTypes/ (tried from the "
                     f"working directory and from {base})", "the CellSighter data folder")
  d = config.data
  d.source = "cellsighter"
  d.cellsighter.root = str(root)
  if cs.get("channels_path"):
    channels = _find(str(cs["channels_path"]), base, want_dir=False)
    if channels is None:
      raise InputError(path, f"channels_path {cs['channels_path']!r} not found", "the channel list file")
    d.cellsighter.channels_file = str(channels)
  d.cellsighter.blacklist = _names(cs.get("blacklist", []), path, "blacklist")
  try:
    if "num_classes" in cs:
      d.cellsighter.class_names = ",".join(str(i) for i in range(int(cs["num_classes"])))
    d.train_fovs = _names(cs["train_set"], path, "train_set")
    d.val_fovs = _names(cs["val_set"], path, "val_set")
    d.crop_size = int(cs.get("crop_size", 128))
    d.input_size = int(cs.get("crop_input_size", 100))
    d.max_per_class = int(cs.get("size_data", 0))
    config.train.epochs = int(cs.get("epoch_max", 50))
    config.train.steps = 0
    config.train.lr = float(cs.get("lr", 1e-3))
    config.train.batch_size = int(cs.get("batch_size", 128))
    config.augment.enabled = bool(cs.get("aug", True))
  except (TypeError, ValueError) as e:
    raise InputError(path, f"a value of the wrong type ({e})",
                     "numbers where CellSighter has them") from None
  hierarchy = cs.get("hierarchy_match")
  if not cs.get("sample_batch", True):
    d.balance = "none"
  elif hierarchy:
    if not isinstance(hierarchy, dict):
      raise InputError(path, f"hierarchy_match is {type(hierarchy).__name__}",
                       "a {class id: category} object")
    # Ids CellSighter never looks up (no cells) need a category here: their own.
    ids = [str(i) for i in range(int(cs.get("num_classes", 0)))]
    mapping = {**{i: f"class {i}" for i in ids}, **{str(k): str(v) for k, v in hierarchy.items()}}
    d.balance = "hierarchy"
    d.hierarchy = ";".join(f"{k}={v}" for k, v in mapping.items())
  else:
    d.balance = "class"
