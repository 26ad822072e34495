"""A trained ensemble as one object, built after training or loaded back from its work directory.

A run that trains leaves in its work directory what it takes to use the model
again, on the same store or another one:

  model.json    the model (its name and arguments), members, objective, classes and
                channels in the model's order, input and read-window sizes,
                normalisation, the store it was trained on
  checkpoints/  the ensemble train state
  config.json   the run's config (for people; `load` needs it only for runs that
                predate model.json's model entry)

`load(workdir)` builds the model, restores the latest checkpoint's parameters and
batch statistics alone (no optimizer: an orbax partial restore) and returns a
`Trained`. `predictor(trained, store)` maps the store's channels onto the model's
(`cellrep.data.transfer`) and returns the jitted eval function; `predict_store`
and `predict_crops` run it over cells of a store or over crops in memory.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from cellrep import distributed, models
from cellrep.data import augment, isolate as isolate_lib, normalize as normalize_lib, transfer
from cellrep.data.crops import NUM_MASK_CHANNELS, CropSource
from cellrep.data.pipeline import data_sharding, eval_batches
from cellrep.data.store import Store
from cellrep.errors import BadValue, InputError
from cellrep.files import read_json, write_text
from cellrep.infer.predict import make_predict_fn, predict
from cellrep.ops import policy as policy_lib
from cellrep.train import objectives
from cellrep.train.checkpoint import latest_step, restore_variables
from cellrep.train.ensemble import make_mesh
from cellrep.train.state import abstract_variables

MODEL_JSON = "model.json"


@dataclasses.dataclass
class Trained:
  """An ensemble ready to predict.

  model: the Flax module as its spec builds it; variables: Flax variables with the member
  axis [M, ...] on every leaf. channels: the model's marker channels in input order;
  classes: its outputs. policy: how it predicts (`cellrep.ops.policy.Policy`: its
  predict_* choices); objective: what a prediction is (softmax probabilities for a
  classifier). masks: whether the network sees the crop's two mask channels after its
  markers (CellSighter's inputs) or the markers alone (the Cell Painting CNN's).
  """
  model: Any
  variables: Any
  classes: tuple[str, ...]
  channels: tuple[str, ...]
  input_size: int
  crop_size: int
  normalize: str
  mesh: Mesh
  policy: policy_lib.Policy = dataclasses.field(default_factory=policy_lib.resolve)
  objective: Any = dataclasses.field(default_factory=objectives.SoftmaxCrossEntropy)
  spec: dict = dataclasses.field(default_factory=dict)  # model.json's "model"
  masks: bool = True
  isolate: int = -1  # crops' markers zeroed beyond the centre cell's mask + this margin

  @property
  def members(self) -> int:
    return int(jax.tree.leaves(self.variables)[0].shape[0])

  @property
  def input_shape(self) -> tuple[int, int, int, int]:
    """[1, n, n, K + 2] of one network input ([1, n, n, K] without masks)."""
    return input_shape(self.input_size, len(self.channels), self.masks)

  def member(self, m: int) -> "Trained":
    """The ensemble of member m alone."""
    return dataclasses.replace(self, variables=jax.tree.map(lambda x: x[m:m + 1], self.variables))


def input_shape(input_size: int, markers: int, masks: bool = True) -> tuple[int, int, int, int]:
  """[1, n, n, C] of one network input: the markers, then the two masks when it sees them."""
  return (1, input_size, input_size, markers + (NUM_MASK_CHANNELS if masks else 0))


def eval_preprocess(input_size: int, method: str = "none", scales=None,
                    cmap: transfer.ChannelMap | None = None, masks: bool = True,
                    isolate: int = isolate_lib.OFF) -> Callable:
  """crops [B, K_store + 2, S, S] -> network inputs [B, n, n, K + 2] (K without masks): the
  centre cell isolated (`isolate` >= 0: `cellrep.data.isolate`), the masks dropped when the
  network does not see them, channel map, centre crop, normalisation."""
  kept = NUM_MASK_CHANNELS if masks else 0

  def preprocess(crops):
    crops = isolate_lib.isolate(crops, isolate)
    if not masks:
      crops = crops[:, :crops.shape[1] - NUM_MASK_CHANNELS]
    if cmap is not None:
      crops = transfer.remap(crops, cmap, masks=kept)
    return normalize_lib.normalize(augment.center(crops, input_size), method, scales, masks=kept)

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
  return eval_preprocess(trained.input_size, trained.normalize, scales, cmap,
                         masks=trained.masks, isolate=trained.isolate), cmap


def predictor(trained: Trained, store: Store, **kwargs) -> tuple[Callable, transfer.ChannelMap]:
  """(predict_fn(variables, crops) -> [M, B, classes], channel map) for crops of `store`."""
  preprocess, cmap = store_preprocess(trained, store, **kwargs)
  return make_predict_fn(trained.model, preprocess, trained.mesh, trained.policy,
                         objective=trained.objective), cmap


def array_batches(crops: np.ndarray, batch_size: int, rows: slice = slice(None)
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Host batches of exactly `batch_size` from crops [N, C, S, S] (this process's `rows` of
  each); padding has index -1."""
  for start in range(0, len(crops), batch_size):
    chunk = np.asarray(crops[start:start + batch_size], np.float32)
    n = len(chunk)
    batch = np.zeros((batch_size,) + chunk.shape[1:], np.float32)
    batch[:n] = chunk
    index = np.full(batch_size, -1, np.int64)
    index[:n] = np.arange(start, start + n)
    yield {"crop": batch[rows], "label": np.zeros(batch_size, np.int32)[rows],
           "index": index[rows]}


def _batch_size(trained: Trained, batch_size: int) -> int:
  """`batch_size` rounded up to a multiple of the mesh's data axis."""
  data = trained.mesh.shape["data"]
  return -(-batch_size // data) * data


def predict_crops(trained: Trained, predict_fn: Callable, crops: np.ndarray,
                  batch_size: int = 256) -> np.ndarray:
  """Member probabilities [N, M, classes] float32 of crops [N, C, S, S] held in memory."""
  if len(crops) == 0:
    return np.zeros((0, trained.members, len(trained.classes)), np.float32)
  sharding, size = data_sharding(trained.mesh), _batch_size(trained, batch_size)
  _, probs = predict(trained.variables, predict_fn,
                     array_batches(crops, size, distributed.local_rows(sharding, size)), sharding)
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
  sharding, size = data_sharding(trained.mesh), _batch_size(trained, batch_size)
  index, probs = predict(trained.variables, predict_fn or fn,
                         eval_batches(CropSource(store, trained.crop_size), indices, size,
                                      threads=threads, rows=distributed.local_rows(sharding, size)),
                         sharding)
  return index, probs, cmap


def write_model_json(workdir, *, spec: dict, members: int, objective, classes, channels,
                     input_size: int, crop_size: int, normalize: str, store, num_steps: int,
                     steps_per_epoch: int, masks: bool = True, isolate: int = -1) -> None:
  """model.json: everything `load` needs besides the checkpoint (written under a temporary
  name, then renamed)."""
  write_text(pathlib.Path(workdir) / MODEL_JSON, json.dumps({
      "model": dict(spec), "members": int(members), "objective": objectives.to_dict(objective),
      "classes": list(classes), "channels": list(channels), "input_size": int(input_size),
      "crop_size": int(crop_size), "normalize": normalize, "masks": bool(masks),
      "isolate": int(isolate),
      "store": str(store),
      "num_steps": int(num_steps), "steps_per_epoch": int(steps_per_epoch)}, indent=1))


def _spec_and_members(workdir: pathlib.Path, meta: dict) -> tuple[dict, int]:
  """The model spec and member count of model.json; a run written before model.json held
  them has them in its config.json."""
  if "model" in meta:
    return dict(meta["model"]), int(meta["members"])
  config = read_json(workdir / "config.json", "the run's config, written by a classify run")
  m = config["model"]
  spec = {"name": m["name"], "num_classes": len(meta["classes"]), "width": m["width"],
          "stem": m["stem"], "dtype": m["dtype"], "conv_impl": m.get("conv_impl", "auto")}
  return spec, int(config["ensemble"]["members"])


def trained_store(workdir) -> str:
  """The store the run at `workdir` trained on, as its model.json records it (or, for runs
  that predate that record, as its config.json implies)."""
  workdir = pathlib.Path(workdir)
  meta = read_json(workdir / MODEL_JSON, "the model's description, written by a classify run")
  if meta.get("store"):
    return meta["store"]
  data = read_json(workdir / "config.json", "the run's config, written by a classify run")["data"]
  if data.get("gating", {}).get("rules"):
    return str(workdir / "store_gated")
  return str(workdir / "store") if data.get("source") != "store" else data["store"]


def load(workdir, *, mesh: Mesh | None = None, strategy: str = "auto", dtype: str = "auto",
         policy: policy_lib.Policy | None = None) -> Trained:
  """The ensemble of the latest checkpoint in `workdir` (a finished or interrupted run).

  strategy, dtype: the member axis and compute dtype of prediction (``auto``: as
  `cellrep.ops.policy.resolve` chooses), unless a `policy` is given.
  """
  workdir = pathlib.Path(workdir)
  path = workdir / MODEL_JSON
  meta = read_json(path, "the model's description, written by a classify run")
  try:
    spec, members = _spec_and_members(workdir, meta)
    classes, channels = tuple(meta["classes"]), tuple(meta["channels"])
    input_size, crop_size = int(meta["input_size"]), int(meta["crop_size"])
    objective = objectives.from_dict(meta.get("objective", {"name": "softmax_cross_entropy"}))
    model = models.build(spec)
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    # BadValue is a ValueError: a model argument the model refuses.
    problem = str(e) if isinstance(e, BadValue) else f"incomplete run description ({e!r})"
    raise InputError(path, problem, "model.json as a classify run writes it") from None
  if not (workdir / "checkpoints").is_dir():
    raise InputError(workdir / "checkpoints", "missing", "a trained classify work directory")
  step = latest_step(workdir / "checkpoints")
  if step is None:
    raise InputError(workdir / "checkpoints", "no checkpoint", "a trained classify work directory")
  mesh = mesh or make_mesh(1, -1)
  masks = bool(meta.get("masks", True))
  variables = restore_variables(
      workdir / "checkpoints", step,
      abstract_variables(model, input_shape(input_size, len(channels), masks), members, mesh))
  if policy is None:
    policy = policy_lib.resolve(conv_impl=spec.get("conv_impl", "auto"),
                                dtype=spec.get("dtype", "float32"), predict_dtype=dtype,
                                predict_strategy=strategy)
  return Trained(model=model, variables=variables, classes=classes, channels=channels,
                 input_size=input_size, crop_size=crop_size,
                 normalize=meta.get("normalize", "none"), mesh=mesh, policy=policy,
                 objective=objective, spec=spec, masks=masks,
                 isolate=int(meta.get("isolate", isolate_lib.OFF)))
