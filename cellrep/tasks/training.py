"""Training an ensemble on a store's cells: the part every training task shares.

A task decides *what* is learnt — which cells in which order (its sampler), how a batch
of crop windows becomes network inputs (its jitted augmentation), the optimizer and its
schedule, the objective, whether the network sees the two mask channels, and optionally
the weights it starts from — as a `Recipe`. `fit_ensemble` does the rest the same way
for every task: the Grain pipeline over the store, the device mesh and the member axis,
the train state (restored when a checkpoint exists), the jitted ensemble step, the loop
with its metrics and checkpoints, and `model.json`, and returns the ensemble as a
`cellrep.infer.trained.Trained`.

Config keys it reads: seed, progress; data.crop_size, input_size, normalize, workers,
threads, prefetch; model.* (the model's name and arguments); ensemble.members,
mesh_member, mesh_data, strategy; train.batch_size, log_every, checkpoint_every,
keep_checkpoints; predict.dtype (`run_policy`).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import parameter_overview

from cellrep import config_util, distributed, files, models
from cellrep.data.crops import CropSource
from cellrep.data.pipeline import data_sharding, train_dataset
from cellrep.data.sampling import EpochSampler
from cellrep.errors import ConfigError
from cellrep.infer import trained as trained_lib
from cellrep.ops import policy as policy_lib
from cellrep.train.checkpoint import Checkpointer
from cellrep.train.ensemble import MemberStep, make_mesh, make_train_step
from cellrep.train.loop import fit
from cellrep.train.metrics import MetricWriter
from cellrep.tasks import stores
from cellrep.train.state import abstract_state, create_state


@dataclasses.dataclass
class Recipe:
  """What a task trains with.

  sampler: the training cells' order (rows of store.cells), num_steps x batch draws.
  preprocess: (key, crops [B, K + 2, S, S]) -> network inputs [B, n, n, C], jittable.
  initial: None (random initialisation), or a function returning one member's Flax
    variables (some or all of them) to start every member from: weights a user brings,
    called only when no checkpoint exists; what it leaves out (a new classifier) keeps
    each member's own initialisation.
  isolate: the margin (px) beyond the centre cell's mask that `preprocess` zeroes
    (`cellrep.data.isolate`; -1: none), written to model.json so that embeddings and
    predictions see crops as training did.
  """
  sampler: EpochSampler
  preprocess: Callable[[jax.Array, jax.Array], jax.Array]
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  objective: Any
  masks: bool = True
  initial: Callable[[], dict] | None = None
  isolate: int = -1


def validate(config, min_input: int = 8) -> None:
  """The checks of the keys `fit_ensemble` reads (a task adds its own)."""
  c, check = config, config_util.check
  config_util.check_choice(c, "predict.dtype", policy_lib.PREDICT_DTYPES)
  config_util.check_choice(c, "ensemble.strategy", policy_lib.STRATEGIES)
  check(c.data.input_size >= min_input, "data.input_size", f"{c.data.input_size} is too small",
        f"≥ {min_input} pixels")
  check(c.data.crop_size >= c.data.input_size, "data.crop_size",
        f"{c.data.crop_size} < data.input_size {c.data.input_size}", "a read window at least the input size")
  stores.check_memory(c)
  check(c.data.prefetch >= 0, "data.prefetch", f"{c.data.prefetch}", "a number of batches ≥ 0")
  check(c.data.threads >= 1, "data.threads", f"{c.data.threads}", "a number of threads ≥ 1")
  check(c.data.workers >= 0, "data.workers", f"{c.data.workers}", "a number of processes ≥ 0")
  check(c.data.fov_window >= 0, "data.fov_window", f"{c.data.fov_window}",
        "0 (all cells shuffled together) or a number of FOVs shuffled together")
  with config_util.config_keys("model"):  # the model checks its own arguments
    models.build(model_spec(c, 1))
  run_policy(c)
  check(c.ensemble.members >= 1, "ensemble.members", f"{c.ensemble.members}", "≥ 1")
  check(c.train.batch_size >= 1, "train.batch_size", f"{c.train.batch_size}", "≥ 1")
  check(c.train.steps >= 0, "train.steps", f"{c.train.steps}", "a number of steps ≥ 1 (0: from train.epochs)")
  check(c.train.epochs >= 0, "train.epochs", f"{c.train.epochs}", "a number of epochs ≥ 0")
  check(c.train.steps > 0 or c.train.epochs > 0, "train.steps", "neither steps nor epochs is set",
        "train.steps > 0 or train.epochs > 0")
  check(c.train.lr > 0 and math.isfinite(c.train.lr), "train.lr", f"{c.train.lr}", "a positive learning rate")
  check(c.train.log_every >= 1 and c.train.checkpoint_every >= 1, "train.log_every",
        "log_every and checkpoint_every must be ≥ 1", "positive step counts")
  check(c.predict.batch_size >= 1, "predict.batch_size", f"{c.predict.batch_size}", "≥ 1")


def steps(config, epoch_size: int) -> tuple[int, int]:
  """(steps per epoch, total steps) for epochs of `epoch_size` draws: train.steps, else
  train.epochs of them."""
  steps_per_epoch = max(1, epoch_size // config.train.batch_size)
  total = config.train.steps if config.train.steps > 0 else config.train.epochs * steps_per_epoch
  return steps_per_epoch, total


def model_spec(config, num_classes: int) -> dict:
  """The model's name and arguments: config.model, and the classes from the data for a model
  that has a classifier (`models.accepts`)."""
  spec = config.model.to_dict()
  if models.accepts(spec.get("name"), "num_classes"):
    spec["num_classes"] = num_classes
  return spec


def run_policy(config) -> policy_lib.Policy:
  """The run's backend policy, from config.model, config.ensemble, config.train, config.predict."""
  with config_util.config_keys("", predict_dtype="predict.dtype", strategy="ensemble.strategy",
                               predict_strategy="ensemble.strategy",
                               conv_impl="model.conv_impl", dtype="model.dtype"):
    return policy_lib.resolve(conv_impl=config.model.conv_impl, dtype=config.model.dtype,
                              predict_dtype=config.predict.dtype,
                              strategy=config.ensemble.strategy,
                              predict_strategy=config.ensemble.strategy,
                              batch=config.train.batch_size)


def metric_writer(workdir: pathlib.Path, tensorboard: bool = True) -> MetricWriter:
  """The run's metric writer; resuming from a checkpoint drops records logged after it."""
  checkpointer = Checkpointer(pathlib.Path(workdir) / "checkpoints")
  try:
    latest = checkpointer.latest_step()
  finally:
    checkpointer.close()
  return MetricWriter(workdir, tensorboard=tensorboard, resume_step=latest)


def make_run_mesh(config):
  """The (member, data) mesh of config.ensemble, checked against the members and the batch."""
  members, batch_size = config.ensemble.members, config.train.batch_size
  mesh = make_mesh(config.ensemble.mesh_member, config.ensemble.mesh_data)
  if members % mesh.shape["member"] or batch_size % mesh.shape["data"]:
    raise ConfigError("ensemble.mesh_member", f"mesh {dict(mesh.shape)} does not divide "
                      f"{members} members / batch {batch_size}", "divisors of members and batch size")
  if distributed.process_count() > 1 and mesh.size != jax.device_count():
    raise ConfigError("ensemble.mesh_data", f"mesh {dict(mesh.shape)} leaves some of the run's "
                      f"{jax.device_count()} devices (and processes) out",
                      "a mesh over every device in a run of several processes (mesh_data=-1)")
  return mesh


def _overlay(tree: dict, given: dict) -> dict:
  """`tree` (leaves [M, ...]) with the leaves `given` holds (one member's) set in every member."""
  out = dict(tree)
  for key, value in given.items():
    if isinstance(value, dict):
      out[key] = _overlay(tree[key], value)
    else:
      like = tree[key]
      out[key] = jax.jit(lambda v, like=like: jnp.broadcast_to(v.astype(like.dtype), like.shape),
                         out_shardings=like.sharding)(jnp.asarray(np.asarray(value)))
  return out


def _start_from(state, initial: dict, tx: optax.GradientTransformation):
  """`state` with every member's variables in `initial` set to them, and a fresh optimizer
  state."""
  params = _overlay(state.params, initial.get("params", {}))
  stats = _overlay(state.batch_stats, initial.get("batch_stats", {}))
  opt_state = jax.jit(jax.vmap(tx.init), out_shardings=jax.tree.map(
      lambda x: x.sharding, state.opt_state))(params)
  return state.replace(params=params, batch_stats=stats, opt_state=opt_state)


def fit_ensemble(config, workdir, plan, writer: MetricWriter, recipe: Recipe
                 ) -> trained_lib.Trained:
  """Trains (or resumes) the ensemble; checkpoints in workdir/checkpoints.

  plan: the task's choice of cells, with .store, .classes, .num_steps, .steps_per_epoch
  and .scales (as `cellrep.tasks.classify.Plan`).
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  store, batch_size, num_steps = plan.store, config.train.batch_size, plan.num_steps
  input_size, channels = config.data.input_size, store.meta.channels
  files.write_text(workdir / "config.json", config.to_json_best_effort(indent=1))

  source = CropSource(store, config.data.crop_size)
  members = config.ensemble.members
  mesh = make_run_mesh(config)
  # Each process reads its rows of every global batch.
  batches = iter(train_dataset(source, recipe.sampler, batch_size, workers=config.data.workers,
                               threads=config.data.threads, prefetch=config.data.prefetch,
                               rows=distributed.local_rows(data_sharding(mesh), batch_size)))

  policy = run_policy(config)
  logging.info("%s", policy.describe())
  spec = model_spec(config, len(plan.classes))
  model = models.build(spec)
  trained_lib.write_model_json(workdir, spec=spec, members=members, objective=recipe.objective,
                               classes=plan.classes, channels=channels, input_size=input_size,
                               crop_size=config.data.crop_size, normalize=config.data.normalize,
                               store=store.path, num_steps=num_steps,
                               steps_per_epoch=plan.steps_per_epoch, masks=recipe.masks,
                               isolate=recipe.isolate)
  input_shape = trained_lib.input_shape(input_size, len(channels), recipe.masks)
  abstract = abstract_state(model, recipe.tx, input_shape, members, mesh)
  checkpointer = Checkpointer(workdir / "checkpoints", config.train.keep_checkpoints)
  latest = checkpointer.latest_step()
  rng = jax.random.key(config.seed)
  if latest is not None:
    logging.info("resuming from checkpoint at step %d", latest)
    state = checkpointer.restore(latest, abstract, batches)
  else:
    state = create_state(jax.random.fold_in(rng, 0), model, recipe.tx, input_shape, members,
                         mesh)
    if recipe.initial is not None:
      state = _start_from(state, recipe.initial(), recipe.tx)
  logging.info("%s member parameters:\n%s", spec["name"],
               parameter_overview.get_parameter_overview(
                   jax.tree.map(lambda x: x[0], state.params), include_stats=False))

  step = make_train_step(MemberStep(policy.train_model(model), recipe.tx, recipe.preprocess,
                                    recipe.objective), mesh, abstract, policy)
  try:
    state = fit(state, step, batches, rng=jax.random.fold_in(rng, 1), num_steps=num_steps,
                data_sharding=data_sharding(mesh), writer=writer, checkpointer=checkpointer,
                checkpoint_every=config.train.checkpoint_every, log_every=config.train.log_every,
                learning_rate=recipe.schedule, progress=config.progress)
  finally:
    checkpointer.close()  # after the saves under way
  return trained_lib.Trained(model=model, variables=state.variables, classes=plan.classes,
                             channels=channels, input_size=input_size,
                             crop_size=config.data.crop_size, normalize=config.data.normalize,
                             mesh=mesh, policy=policy, objective=recipe.objective, spec=spec,
                             masks=recipe.masks, isolate=recipe.isolate)
