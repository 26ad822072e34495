"""Configs as the command line loads them, a tiny classify config and run, dotted overrides."""

from __future__ import annotations

import importlib.util
import pathlib

from cellrep.tasks import classify
from tests.conftest import REPO
from tests.data.helpers import square_cells_store


def get_config(name: str, arg: str | None = None):
  """configs/<name>.py's get_config(arg), locked as `--config=configs/<name>.py:arg` is."""
  spec = importlib.util.spec_from_file_location(f"{name}_config", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.lock()
  return config


def override(config, values: dict):
  """`config` with {"a.b": value, ...} set (dotted keys), returned for chaining."""
  for key, value in values.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return config


def tiny_config(store_path, steps=4, members=2):
  """A classify run of seconds: ResNet-18 x1/16 on 12 px inputs, batch 8."""
  c = classify.default_config()
  c.progress = False
  c.data.store = str(store_path)
  c.data.crop_size = 16
  c.data.input_size = 12
  c.data.threads = 2
  c.model.update(name="resnet18", width=0.0625, stem="small")
  c.ensemble.members = members
  c.train.update(steps=steps, batch_size=8, lr=1e-3, schedule="constant", log_every=1,
                 checkpoint_every=2)
  c.predict.batch_size = 16
  c.predict.cellsighter_csv = True
  return c


def tiny_run(root: pathlib.Path, **values):
  """A store of square cells in 3 FOVs and a 2-step tiny run on it, fov2 held out (plus
  `values`, dotted keys as `override`'s): (store, work directory)."""
  store = square_cells_store(root / "store", fov_shapes=((40, 40), (40, 40), (30, 40)))
  config = override(tiny_config(store.path, steps=2), {"data.val_fovs": "fov2", **values})
  classify.run(config, root / "run")
  return store, root / "run"
