"""A trained ensemble as one object, built after training or loaded back from its work directory.

A `classify` run leaves in its work directory what it takes to use the model
again, on the same store or another one:

  config.json   the run's config (model, optimizer, ensemble, data settings)
  model.json    classes and channels in the model's order, input and read-window
                sizes, normalisation, and the step count the optimizer was built for
  checkpoints/  the ensemble train state

`load(workdir)` rebuilds the model and optimizer from these, restores the latest
checkpoint's parameters and batch statistics, and returns a `Trained`.
`predictor(trained, store)` maps the store's channels onto the model's
(`cellrep.data.transfer`) and returns the jitted eval function; `predict_store`
and `predict_crops` run it over cells of a store or over crops in memory.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from cellrep.data import augment, normalize as normalize_lib, transfer
from cellrep.data.crops import NUM_MASK_CHANNELS, CropSource
from cellrep.data.pipeline import data_sharding, eval_batches
from cellrep.data.store import Store
from cellrep.errors import InputError
from cellrep.infer.predict import make_predict_fn, predict
from cellrep.models import get_model
from cellrep.train.checkpoint import Checkpointer
from cellrep.train.ensemble import make_mesh
from cellrep.train.optim import adam, learning_rate
from cellrep.train.state import abstract_state

MODEL_JSON = "model.json"


def model_and_optimizer(config, num_classes: int, num_steps: int, steps_per_epoch: int):
  """(Flax model, optax optimizer, learning-rate schedule) as `config.model` / `config.train` say."""
  model = get_model(config.model.name, num_classes, width=config.model.width,
                    stem=config.model.stem, dtype=config.model.dtype,
                    conv_impl=config.model.get("conv_impl", "auto"))
  schedule = learning_rate(config.train.lr, config.train.schedule, num_steps,
                           decay_rate=config.train.decay_rate,
                           decay_steps=config.train.decay_epochs * steps_per_epoch,
                           warmup_steps=config.train.warmup_steps)
  return model, adam(schedule, config.train.weight_decay, config.train.grad_clip), schedule


@dataclasses.dataclass
class Trained:
  """An ensemble ready to predict.

  variables: Flax variables with the member axis [M, ...] on every leaf.
  channels: the model's marker channels in input order; classes: its outputs.
  """
  model: Any
  variables: Any
  classes: tuple[str, ...]
  channels: tuple[str, ...]
  input_size: int
  crop_size: int
  normalize: str
  mesh: Mesh
  strategy: str = "auto"
  dtype: str = "auto"  # compute dtype of prediction (cellrep.infer.predict.resolve_dtype)

  @property
  def members(self) -> int:
    return int(jax.tree.leaves(self.variables)[0].shape[0])

  def member(self, m: int) -> "Trained":
    """The ensemble of member m alone."""
    return dataclasses.replace(self, variables=jax.tree.map(lambda x: x[m:m + 1], self.variables))


def eval_preprocess(input_size: int, method: str = "none", scales=None,
                    cmap: transfer.ChannelMap | None = None) -> Callable:
  """crops [B, K_store + 2, S, S] -> network inputs [B, n, n, K + 2]: channel map, centre crop,
  normalisation."""

  def preprocess(crops):
    if cmap is not None:
      crops = transfer.remap(crops, cmap)
    return normalize_lib.normalize(augment.center(crops, input_size), method, scales)

  return preprocess


def store_preprocess(trained: Trained, store: Store, *, min_overlap: float = 0.8,
                     renames=None, scales=None) -> tuple[Callable, transfer.ChannelMap]:
  """The eval preprocessing of `store`'s crops for `trained`, and the channel map it uses.

  scales: the store's own p99 divisors when already computed (else computed here).
  """
  cmap = transfer.map_channels(trained.channels, store.meta.channels, min_overlap=min_overlap,
                               renames=renames, where=store.path)
  if trained.normalize == "p99":
    own = normalize_lib.store_scales(store, "p99") if scales is None else np.asarray(scales)
    # Divisors in the model's channel order; a missing channel is zeros, any divisor will do.
    scales = np.where(np.asarray(cmap.index) >= 0, own[np.maximum(cmap.index, 0)], 1.0)
  return eval_preprocess(trained.input_size, trained.normalize, scales, cmap), cmap


def predictor(trained: Trained, store: Store, **kwargs) -> tuple[Callable, transfer.ChannelMap]:
  """(predict_fn(variables, crops) -> [M, B, classes], channel map) for crops of `store`."""
  preprocess, cmap = store_preprocess(trained, store, **kwargs)
  return make_predict_fn(trained.model, preprocess, trained.mesh, trained.strategy,
                         dtype=trained.dtype), cmap


def array_batches(crops: np.ndarray, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Host batches of exactly `batch_size` from crops [N, C, S, S]; padding has index -1."""
  for start in range(0, len(crops), batch_size):
    chunk = np.asarray(crops[start:start + batch_size], np.float32)
    n = len(chunk)
    batch = np.zeros((batch_size,) + chunk.shape[1:], np.float32)
    batch[:n] = chunk
    index = np.full(batch_size, -1, np.int64)
    index[:n] = np.arange(start, start + n)
    yield {"crop": batch, "label": np.zeros(batch_size, np.int32), "index": index}


def _batch_size(trained: Trained, batch_size: int) -> int:
  """`batch_size` rounded up to a multiple of the mesh's data axis."""
  data = trained.mesh.shape["data"]
  return -(-batch_size // data) * data


def predict_crops(trained: Trained, predict_fn: Callable, crops: np.ndarray,
                  batch_size: int = 256) -> np.ndarray:
  """Member probabilities [N, M, classes] float32 of crops [N, C, S, S] held in memory."""
  if len(crops) == 0:
    return np.zeros((0, trained.members, len(trained.classes)), np.float32)
  _, probs = predict(trained.variables, predict_fn,
                     array_batches(crops, _batch_size(trained, batch_size)),
                     data_sharding(trained.mesh))
  return probs


def predict_store(trained: Trained, store: Store, indices: np.ndarray | None = None, *,
                  batch_size: int = 256, threads: int = 8, predict_fn: Callable | None = None,
                  **kwargs) -> tuple[np.ndarray, np.ndarray, transfer.ChannelMap]:
  """Predicts cells of `store` (rows of cells.parquet; default all).

  Returns (row indices [N], member probabilities [N, M, classes], channel map).
  kwargs: `store_preprocess`'s min_overlap, renames, scales.
  """
  fn, cmap = predictor(trained, store, **kwargs)
  indices = np.arange(len(store.cells)) if indices is None else np.asarray(indices)
  index, probs = predict(trained.variables, predict_fn or fn,
                         eval_batches(CropSource(store, trained.crop_size), indices,
                                      _batch_size(trained, batch_size), threads=threads),
                         data_sharding(trained.mesh))
  return index, probs, cmap


def write_model_json(workdir, *, classes, channels, input_size: int, crop_size: int,
                     normalize: str, num_steps: int, steps_per_epoch: int) -> None:
  path = pathlib.Path(workdir) / MODEL_JSON
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps({
      "classes": list(classes), "channels": list(channels), "input_size": int(input_size),
      "crop_size": int(crop_size), "normalize": normalize, "num_steps": int(num_steps),
      "steps_per_epoch": int(steps_per_epoch)}, indent=1))
  tmp.replace(path)


def _read_json(path: pathlib.Path, what: str) -> dict:
  if not path.is_file():
    raise InputError(path, "missing", f"{what}, written by a classify run")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise InputError(path, f"not valid JSON ({e.msg} at line {e.lineno})") from None


def load(workdir, *, mesh: Mesh | None = None, strategy: str = "auto", dtype: str = "auto"
         ) -> Trained:
  """The ensemble of the latest checkpoint in `workdir` (a finished or interrupted classify run)."""
  workdir = pathlib.Path(workdir)
  config = ml_collections.ConfigDict(_read_json(workdir / "config.json", "the run's config"))
  meta = _read_json(workdir / MODEL_JSON, "the model's classes and channels")
  try:
    classes, channels = tuple(meta["classes"]), tuple(meta["channels"])
    input_size, crop_size = int(meta["input_size"]), int(meta["crop_size"])
    model, tx, _ = model_and_optimizer(config, len(classes), int(meta["num_steps"]),
                                       int(meta["steps_per_epoch"]))
    members = int(config.ensemble.members)
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    raise InputError(workdir / MODEL_JSON, f"incomplete run description ({e!r})",
                     "model.json and config.json as a classify run writes them") from None
  if not (workdir / "checkpoints").is_dir():
    raise InputError(workdir / "checkpoints", "missing", "a trained classify work directory")
  checkpointer = Checkpointer(workdir / "checkpoints")
  try:
    step = checkpointer.latest_step()
    if step is None:
      raise InputError(workdir / "checkpoints", "no checkpoint", "a trained classify work directory")
    mesh = mesh or make_mesh(1, -1)
    abstract = abstract_state(model, tx, (1, input_size, input_size,
                                          len(channels) + NUM_MASK_CHANNELS), members, mesh)
    state = checkpointer.restore(step, abstract)
  finally:
    checkpointer.close()
  return Trained(model=model, variables=state.variables, classes=classes, channels=channels,
                 input_size=input_size, crop_size=crop_size,
                 normalize=meta.get("normalize", "none"), mesh=mesh, strategy=strategy,
                 dtype=dtype)
