"""The Cell Painting CNN: EfficientNet-B0 trained weakly supervised on treatments, its single-cell
features, and the profiles they make (Moshkov et al. 2024; DeepProfiler).

  store (a DeepProfiler project ingested, or synthetic plates) -> nuclei-centred crops, no masks
  -> an ensemble trained to tell treatments apart (the pretext task) -> block6a_activation
  per cell -> site median -> well mean -> sphering on controls -> replicate and same-MoA mAP,
  against a randomly initialised EfficientNet-B0 and mean-intensity features.

Writes into the work directory:
  project/, store/       with data.source "synthetic_plates": the plates as a DeepProfiler
                         project, and the store ingested from it
  config.json, model.json, checkpoints/, metrics.jsonl, tensorboard/   as every training run
  pretext.parquet        held-out cells' predicted treatments (both validation splits)
  features/<set>/embeddings.parquet   per-cell features: wsl (the trained model), random_init,
                         mean_intensity; features/wsl/deepprofiler/ in DeepProfiler's layout
  profiles/<set>/        a profile evaluation of each set (cellrep.tasks.profile_eval), and
                         profiles/wsl_unsphered/ without sphering
  report/index.html      training curves, pretext scores per split, mAP against λ, mAP per
                         MoA, well profiles before and after sphering

Splits: the plates of data.val_plates (else a data.val_plate_fraction of them) are left
out of training (leave-plates-out); of every other well, data.train_cell_fraction of the
cells train and the rest are held out (leave-cells-out). Both held-out sets are scored.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pandas as pd
from absl import logging
from ml_collections import config_dict

from cellrep import config_util, files, models
from cellrep.config_util import comma_list
from cellrep.data import augment_cellpainting as augment_lib
from cellrep.data import synthetic_cellpainting
from cellrep.data.crops import NUM_MASK_CHANNELS
from cellrep.data.sampling import EpochSampler, median_group_size
from cellrep.data.store import Store, open_store
from cellrep.errors import ConfigError
from cellrep.infer import trained as trained_lib
from cellrep.infer.predict import ensemble as ensemble_probs
from cellrep.profiling import sphering
from cellrep.tasks import cellpainting_profiles, profile_eval, stores, training
from cellrep.train.objectives import SoftmaxCrossEntropy
from cellrep.train.optim import learning_rate, sgd

SOURCES = ("store", "synthetic_plates")
RESAMPLE = ("median", "none")
STRENGTH_GROUPS = ("weakest", "median", "strongest")


def default_config() -> ml_collections.ConfigDict:
  """Every key the task reads, with the Cell Painting CNN's values where the paper has one."""
  c = ml_collections.ConfigDict()
  c.task = "cellpainting"
  c.seed = 0
  c.progress = True
  c.data = dict(
      source="store",                      # "store" (data.store) or "synthetic_plates"
      store=config_dict.placeholder(str),  # a store of nuclei (configs/ingest.py, format deepprofiler)
      synthetic_plates=dataclasses.asdict(synthetic_cellpainting.CellPaintingConfig()),
      chunk_size=64,                       # chunk edge of a store the run writes
      crop_size=128,                       # read window around each nucleus
      input_size=128,                      # network input (the centre of the window)
      normalize="standardize",             # per crop and channel, as DeepProfiler renormalises
      plate="Metadata_Plate", well="Metadata_Well",
      val_plates="",                       # plates left out of training, comma-separated
      val_plate_fraction=0.25,             # else this fraction of the plates (at least one)
      train_cell_fraction=0.6,             # of each training well's cells; the rest held out
      resample="median",                   # every epoch each treatment drawn to the median count
      # Train on a strength subset: "weakest", "median" or "strongest" (with the controls),
      # the groups of strength_table (a profile evaluation's strength.parquet); "" = all.
      train_strength="", strength_table="",
      workers=0, threads=8, prefetch=2,
      **stores.memory_defaults(),
      fov_window=0,
  )
  c.model = dict(name="efficientnet_b0", dropout=0.2, drop_connect=0.0, padding="same",
                 bn_epsilon=1e-3, bn_momentum=0.99, dtype="float32", conv_impl="auto",
                 head_init="glorot_uniform")  # DeepProfiler's ClassProb layer
  # Weights to start from: a Keras HDF5 (.h5, the Cell Painting CNN or keras.applications) or a
  # torchvision state_dict (.pt/.pth); "" = random. adapt: how 3 input channels become K.
  c.init = dict(weights="", adapt="average")
  c.ensemble = dict(members=1, strategy="auto", mesh_member=1, mesh_data=-1)
  c.train = dict(steps=0, epochs=30, batch_size=32, lr=0.005, schedule="cosine",
                 warmup_epochs=1.0, momentum=0.9, nesterov=True, l2=1e-5, grad_clip=0.0,
                 label_smoothing=0.0, log_every=50, checkpoint_every=500, keep_checkpoints=2)
  c.augment = dataclasses.asdict(augment_lib.CellPaintingAugmentConfig())
  c.predict = dict(batch_size=128, dtype="auto")
  c.features = dict(layers="block6a_activation",          # named layers, mean-pooled per cell
                    baselines="random_init,mean_intensity",  # feature sets scored beside it
                    deepprofiler=True,                      # features/wsl/deepprofiler/*.npz
                    memory_budget_mb=256.0)
  pe = profile_eval.default_config()
  c.profile = dict(columns=pe.columns.to_dict(), controls=pe.controls,
                   sphering=pe.sphering.to_dict(), retrieval=pe.retrieval.to_dict())
  c.profile.sphering.epsilon = config_dict.placeholder(float)
  return c


def validate(config) -> None:
  c, check = config, config_util.check
  config_util.check_choice(c, "data.source", SOURCES)
  config_util.check_choice(c, "data.resample", RESAMPLE)
  config_util.check_choice(c, "data.train_strength", ("",) + STRENGTH_GROUPS)
  check(bool(c.data.strength_table) == bool(c.data.train_strength), "data.strength_table",
        "given without data.train_strength" if c.data.strength_table
        else f"not given for data.train_strength={c.data.train_strength!r}",
        "both or neither: a strength.parquet (profiles/<set>/ of a run) and a strength group")
  if c.data.strength_table:  # before any long work (the store, training)
    _strength_treatments(c.data, c.profile.columns.treatment)
  config_util.check_choice(c, "data.normalize", ("standardize",))
  config_util.check_choice(c, "train.schedule", ("constant", "cosine"))
  if c.data.source == "store":
    check(bool(c.data.store), "data.store", "no store path given",
          "a store of nuclei (configs/ingest.py with ingest.format=deepprofiler)")
  else:
    with config_util.config_keys("data.synthetic_plates"):
      synthetic_cellpainting.from_config(c.data.synthetic_plates)
  check(0 <= c.data.val_plate_fraction < 1, "data.val_plate_fraction",
        f"{c.data.val_plate_fraction}", "a fraction in [0, 1) (0: no plate held out)")
  check(0 < c.data.train_cell_fraction < 1, "data.train_cell_fraction",
        f"{c.data.train_cell_fraction}", "a fraction in (0, 1)")
  training.validate(c, min_input=16)
  with config_util.config_keys("augment"):
    augment_lib.CellPaintingAugmentConfig(**c.augment.to_dict())
  check(0 <= c.train.momentum < 1, "train.momentum", f"{c.train.momentum}", "a momentum in [0, 1)")
  check(c.train.l2 >= 0, "train.l2", f"{c.train.l2}", "an L2 factor ≥ 0")
  check(c.train.warmup_epochs >= 0, "train.warmup_epochs", f"{c.train.warmup_epochs}",
        "a number of epochs ≥ 0")
  config_util.check_choice(c, "init.adapt", ("average", "tile"))
  unknown = sorted(set(comma_list(c.features.baselines)) - set(cellpainting_profiles.BASELINES))
  check(not unknown, "features.baselines", f"unknown {unknown}",
        f"names among {list(cellpainting_profiles.BASELINES)}")
  check(c.features.memory_budget_mb > 0, "features.memory_budget_mb",
        f"{c.features.memory_budget_mb}", "a positive number of MiB")
  cellpainting_profiles.check_layers(c)
  with config_util.nested_config("profile"):  # before training, not after it
    profile_eval.validate(cellpainting_profiles.profile_config(c, "features.parquet"))


# ---------------------------------------------------------------- which cells


@dataclasses.dataclass
class Plan:
  """What a run trains on and scores: rows of store.cells.

  labels: [cells] treatment index (-1 without one); train_idx: the training cells;
  val_cells_idx: the other cells of the training plates' wells (leave-cells-out);
  val_plates_idx: every cell of the held-out plates (leave-plates-out).
  """
  store: Store
  classes: tuple[str, ...]
  labels: np.ndarray
  train_plates: list[str]
  val_plates: list[str]
  train_idx: np.ndarray
  val_cells_idx: np.ndarray
  val_plates_idx: np.ndarray
  per_treatment: int
  num_steps: int
  steps_per_epoch: int
  scales: None = None


def _open_store(config, workdir: pathlib.Path) -> Store:
  d = config.data
  if d.source == "store":
    return stores.with_memory(open_store(d.store), config)

  def make(path):
    cfg = synthetic_cellpainting.from_config(d.synthetic_plates)
    project = workdir / "project"
    logging.info("writing synthetic Cell Painting plates to %s: %s", project, cfg)
    synthetic_cellpainting.write_project(project, cfg)
    from cellrep.data import deepprofiler_project
    return deepprofiler_project.ingest_deepprofiler(
        project, path, channels=synthetic_cellpainting.CHANNELS,
        label_column=config.profile.columns.treatment, overwrite=True, chunk_size=d.chunk_size)
  store = stores.derived_store(workdir, "store", d.synthetic_plates.to_dict(),
                               "data.synthetic_plates", make)
  return stores.with_memory(store, config)


def prepare(config, workdir) -> Plan:
  """Checks the config, opens (or makes) the store, and splits its cells."""
  validate(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  store = _open_store(config, workdir)
  d = config.data
  cells = store.cells
  columns = config.profile.columns
  for key, column in (("data.plate", d.plate), ("data.well", d.well),
                      ("profile.columns.treatment", columns.treatment),
                      ("profile.columns.moa", columns.moa), ("profile.columns.plate", columns.plate)):
    config_util.check(not column or column in cells, key, f"{store.path} has no column {column!r}",
                      f"a column of its cells, among {[c for c in cells.columns if c.startswith('Metadata_')][:12]}")
  controls = sphering.control_mask(cells, config.profile.controls, "profile.controls")
  config_util.check(controls.sum() >= 2, "profile.controls", "matches fewer than 2 cells",
                    "a query selecting the control cells' wells")
  classes = store.meta.classes
  if not classes:
    raise ConfigError("data.store", f"{store.path} has no treatments (labels)",
                      "a store ingested with a label field (ingest.label_field)")
  labels = store.label_ids()
  plates = cells[d.plate].astype(str).to_numpy()
  names = sorted(set(plates))
  val_plates = comma_list(d.val_plates)
  unknown = sorted(set(val_plates) - set(names))
  config_util.check(not unknown, "data.val_plates", f"unknown plates {unknown}",
                    f"names among {names[:20]}")
  if not val_plates and d.val_plate_fraction > 0:
    k = max(1, int(round(d.val_plate_fraction * len(names))))
    val_plates = sorted(np.random.default_rng(config.seed).permutation(names)[:k].tolist())
  train_plates = [p for p in names if p not in val_plates]
  config_util.check(bool(train_plates), "data.val_plates", "every plate is held out",
                    "at least one training plate")
  train_idx, val_cells_idx = _split_cells(cells, plates, train_plates, labels, d, config.seed)
  val_plates_idx = np.flatnonzero(np.isin(plates, val_plates) & (labels >= 0))
  if d.train_strength:
    chosen = _strength_subset(d, columns.treatment, classes, labels, controls)
    train_idx, val_cells_idx, val_plates_idx = (
        idx[chosen[idx]] for idx in (train_idx, val_cells_idx, val_plates_idx))
  if not len(train_idx):
    raise ConfigError("data.val_plates", "no cells with a treatment left to train on",
                      "training plates whose cells have treatments")
  if d.resample == "median":
    per_treatment = median_group_size(labels[train_idx])
    epoch = per_treatment * len(np.unique(labels[train_idx]))
  else:
    per_treatment, epoch = 0, len(train_idx)
  steps_per_epoch, num_steps = training.steps(config, epoch)
  logging.info("%d treatments; %d training cells (plates %s), %d held-out cells of those plates, "
               "%d cells of held-out plates %s; %d steps", len(classes), len(train_idx),
               ",".join(train_plates), len(val_cells_idx), len(val_plates_idx),
               ",".join(val_plates), num_steps)
  return Plan(store, classes, labels, train_plates, val_plates, train_idx, val_cells_idx,
              val_plates_idx, per_treatment, num_steps, steps_per_epoch)


def _strength_treatments(d, treatment: str) -> set[str]:
  """The data.train_strength treatments of data.strength_table (read and checked)."""
  table = profile_eval.read_profiles(d.strength_table)
  for column in (treatment, "strength_group"):
    config_util.check(column in table, "data.strength_table",
                      f"{d.strength_table} has no column {column!r}",
                      "a strength.parquet of a profile evaluation (treatment, strength_group)")
  return set(table.loc[table.strength_group == d.train_strength, treatment].astype(str))


def _strength_subset(d, treatment: str, classes, labels: np.ndarray,
                     controls: np.ndarray) -> np.ndarray:
  """[cells] bool: the cells of data.strength_table's data.train_strength treatments and the
  controls' cells (the pretext task still tells treatments from the controls)."""
  names = _strength_treatments(d, treatment)
  ids = [i for i, name in enumerate(classes) if name in names]
  config_util.check(bool(ids), "data.train_strength",
                    f"no treatment of the {d.train_strength!r} group of {d.strength_table} is "
                    "in the store", "a strength table of this store's treatments")
  logging.info("training on the %s %d treatments of %s and the controls", d.train_strength,
               len(ids), d.strength_table)
  return np.isin(labels, ids) | controls  # of cells with a treatment: all three sets


def _split_cells(cells: pd.DataFrame, plates: np.ndarray, train_plates, labels: np.ndarray, d,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Of each training plate's wells, train_cell_fraction of the labelled cells (at least one
  per well) to training, the rest held out."""
  rows = np.flatnonzero(np.isin(plates, train_plates) & (labels >= 0))
  wells = pd.factorize(pd.Series(plates[rows]) + "/" + cells[d.well].astype(str).to_numpy()[rows])[0]
  rng = np.random.default_rng((seed, 17))
  key = rng.random(len(rows))
  order = np.lexsort((key, wells))
  sorted_wells = wells[order]
  starts = np.searchsorted(sorted_wells, sorted_wells, side="left")
  rank = np.arange(len(order)) - starts
  size = np.bincount(wells)[sorted_wells]
  keep = rank < np.maximum(1, np.round(d.train_cell_fraction * size))
  train = np.sort(rows[order[keep]])
  held = np.sort(rows[order[~keep]])
  return train, held


# ---------------------------------------------------------------- training


def _initial_weights(config, model, markers: int) -> dict:
  """One member's variables from the file of init.weights, its first layer adapted to the
  store's markers; without the classifier (its classes are not these treatments: each member
  draws its own)."""
  from cellrep.models import import_weights
  with config_util.config_keys("init", weights="init.weights", method="init.adapt",
                               channels="init.weights"):
    imported = import_weights.from_file(config.init.weights)
    if imported.in_channels != markers:
      imported = import_weights.adapt_input_channels(imported, markers, config.init.adapt)
    shape = trained_lib.input_shape(config.data.input_size, markers, masks=False)
    fresh = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape, jnp.float32)))
    params = dict(imported.variables["params"], predictions=fresh["params"]["predictions"])
    import_weights.check_matches(dataclasses.replace(
        imported, variables=dict(imported.variables, params=params)), fresh)
  differ = {k: (config.model[k], v) for k, v in imported.spec.items()
            if k in config.model and config.model[k] != v}
  if differ:
    logging.warning("the weights of %s were trained with %s; config.model has %s",
                    config.init.weights, {k: v for k, (_, v) in differ.items()},
                    {k: c for k, (c, _) in differ.items()})
  logging.info("starting from the weights of %s (a new classifier)", config.init.weights)
  params = {k: v for k, v in imported.variables["params"].items() if k != "predictions"}
  return dict(imported.variables, params=params)


def train(config, workdir, plan: Plan, writer) -> trained_lib.Trained:
  """The Cell Painting CNN's recipe: treatments resampled to the median count every epoch,
  DeepProfiler's augmentations, SGD with Nesterov momentum and L2, softmax cross-entropy;
  markers only (the masks of the crops are dropped)."""
  store = plan.store
  sampler = EpochSampler(plan.train_idx, plan.num_steps * config.train.batch_size, config.seed,
                         fovs=store.cells.fov.to_numpy()[plan.train_idx],
                         fov_window=config.data.fov_window,
                         groups=plan.labels[plan.train_idx] if plan.per_treatment else None,
                         per_group=plan.per_treatment)
  t = config.train
  schedule = learning_rate(t.lr, t.schedule, plan.num_steps,
                           warmup_steps=int(round(t.warmup_epochs * plan.steps_per_epoch)))
  tx = sgd(schedule, t.momentum, t.nesterov, t.l2, t.grad_clip)
  with config_util.config_keys("augment"):
    cfg = augment_lib.CellPaintingAugmentConfig(**config.augment.to_dict())
  augment = functools.partial(augment_lib.augment, input_size=config.data.input_size, cfg=cfg)

  def preprocess(key, crops):
    return augment(key, crops[:, :crops.shape[1] - NUM_MASK_CHANNELS])

  initial = None
  if config.init.weights:
    model = models.build(training.model_spec(config, len(plan.classes)))
    initial = functools.partial(_initial_weights, config, model, len(store.meta.channels))
  recipe = training.Recipe(sampler, preprocess, tx, schedule,
                           SoftmaxCrossEntropy(t.label_smoothing), masks=False, initial=initial)
  return training.fit_ensemble(config, workdir, plan, writer, recipe)


def pretext_scores(config, workdir, plan: Plan, trained: trained_lib.Trained) -> dict:
  """Treatment prediction on both held-out sets: accuracy, macro precision and recall."""
  from sklearn.metrics import precision_recall_fscore_support
  rows, scalars = [], {}
  for split, idx in (("cells", plan.val_cells_idx), ("plates", plan.val_plates_idx)):
    if not len(idx):
      continue
    index, member_probs, _ = trained_lib.predict_store(
        trained, plan.store, idx, batch_size=config.predict.batch_size,
        threads=config.data.threads)
    _, pred, _ = ensemble_probs(member_probs)
    truth = plan.labels[index]
    present = np.union1d(truth, pred)  # treatments absent from a split do not count as 0
    p, r, _, _ = precision_recall_fscore_support(truth, pred, labels=present, average="macro",
                                                 zero_division=0)
    acc = float(np.mean(pred == truth))
    scalars.update({f"pretext/{split}_accuracy": acc, f"pretext/{split}_precision": float(p),
                    f"pretext/{split}_recall": float(r)})
    rows.append(pd.DataFrame({"split": f"held-out {split}", "row": index,
                              "treatment": np.asarray(plan.classes)[truth],
                              "predicted": np.asarray(plan.classes)[pred]}))
  if rows:
    files.write_table(pd.concat(rows, ignore_index=True), pathlib.Path(workdir) / "pretext.parquet")
  scalars["pretext/chance"] = 1.0 / len(plan.classes)
  return scalars


def run(config, workdir) -> dict:
  """prepare -> train -> pretext scores -> features -> profiles -> report; returns the scalars
  written to metrics.jsonl at the end."""
  workdir = pathlib.Path(workdir)
  plan = prepare(config, workdir)
  writer = training.metric_writer(workdir)
  try:
    trained = train(config, workdir, plan, writer)
    scalars = pretext_scores(config, workdir, plan, trained)
    summaries = cellpainting_profiles.features_and_profiles(config, workdir, plan.store, trained)
    scalars.update(cellpainting_profiles.profile_scalars(config, workdir, summaries))
    cellpainting_profiles.report(config, workdir, plan, scalars, summaries)
    writer.write(plan.num_steps, scalars)
  finally:
    writer.close()
  logging.info("pretext accuracy %.3f (held-out plates), replicate mAP %.3f sphered, %.3f "
               "unsphered; report: %s", scalars.get("pretext/plates_accuracy", float("nan")),
               scalars.get("profile/wsl/activity_map", float("nan")),
               scalars.get("profile/wsl_unsphered/activity_map", float("nan")),
               workdir / "report" / "index.html")
  return scalars
