"""CellSighter, complete: the classify task, then the paper's analyses of the trained ensemble.

  python -m cellrep.launch --config=configs/cellsighter.py:runlocal --workdir=DIR

Training, prediction and the classification report are the classify task's
(`classify.run`); this task adds, on the same held-out cells:

  baseline        XGBoost on per-cell arcsinh mean expression, trained on exactly the
                  ensemble's training cells; its predictions and per-class recall next
                  to the ensemble's and one member's (`cellrep.eval.baselines`)
  confidence      wrong-and-confident fraction, recall and coverage at confidence
                  thresholds, top-2 confusions: ensemble vs one member vs XGBoost
  saliency        guided/plain input gradients per class and marker, radial profiles
  simulate        spillover patch, membrane fraction, moving patch (needs
                  simulate.class_a/marker_a/class_b/marker_b)
  learning_curve  models trained on N cells per class, with repeats (off by default)
  transfer        the model applied to another store, channels mapped by name

Writes, besides classify's outputs:
  predictions_xgboost.parquet       XGBoost's held-out predictions (same columns)
  analysis/models.csv               per model: balanced recall, accuracy, wrong_confident_0.9, top-2
  analysis/recall_by_class.csv      per-class recall of each model
  analysis/recall_coverage.csv      per model and confidence threshold
  analysis/saliency_markers.csv, analysis/saliency_radial.csv
  analysis/simulations.csv
  analysis/learning_curve.csv       one row per (cells per class, repeat); runs in learning_curve/
  transfer/                         predictions.parquet, predictions_cellsighter.csv, channel_map.csv
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib

import ml_collections
import numpy as np
import pandas as pd
from absl import logging

from cellrep import config_util
from cellrep.data import synthetic
from cellrep.data.crops import CropSource
from cellrep.data.expression import expression_matrix
from cellrep.data.sampling import cap_per_class, parse_hierarchy
from cellrep.data.store import Store, open_store
from cellrep.eval import baselines, classification, learning_curve, saliency, simulate
from cellrep.errors import ConfigError
from cellrep.eval.report import Report
from cellrep.files import write_table
from cellrep.infer import trained as trained_lib
from cellrep.tasks import classify, predict, stores, training


def default_config() -> ml_collections.ConfigDict:
  c = classify.default_config()
  c.task = "cellsighter"
  c.predict.cellsighter_csv = True
  c.baseline = dict(cofactor=5.0, n_estimators=100, max_depth=2, learning_rate=0.3,
                    balance="class")  # "none" | "class" | "hierarchy" (data.hierarchy)
  c.confidence = dict(thresholds="0.5,0.6,0.7,0.8,0.9,0.95", member=0)
  c.saliency = dict(enabled=True, method="guided", member=-1,  # -1: the ensemble's mean
                    cells_per_class=20, heatmap_cells=1, batch_size=64)
  c.simulate = dict(enabled=True, class_a="", marker_a="", class_b="", marker_b="",
                    lambda_a=0.0, lambda_b=0.0, membrane_width=2.0, patch_radius=2.0,
                    blur_sigma=0.0, border_distances="-2,-1,0,1,2", fractions="1,0.5,0.25,0.125",
                    centre_distances="0,0.25,0.5,0.75,1,1.25,1.5", cells=200, repeats=2, seed=0)
  c.learning_curve = dict(enabled=False, sizes="100,250,500,1000,5000", repeats=3, members=1,
                          steps=0)  # steps 0: as train.steps / train.epochs give
  c.transfer = dict(store="",              # a store to predict with the trained model
                    synthetic=False,       # or a new synthetic tissue (data.synthetic, seed + 1)
                    drop_channels="",      # ... without these channels, in reversed order
                    min_overlap=0.8, renames="")
  return c


def _labelled_rows(result: classify.Evaluation, labels: np.ndarray) -> np.ndarray:
  """Positions in the held-out predictions of the labelled cells."""
  return np.flatnonzero(labels[result.index] >= 0)


def _crops(store: Store, crop_size: int, rows) -> np.ndarray:
  source = CropSource(store, crop_size)
  return np.stack([source[int(i)]["crop"] for i in rows])


@dataclasses.dataclass
class _Analyses:
  """The analyses of one trained run; expression features and XGBoost are made once, on demand."""
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  plan: classify.Plan
  trained: trained_lib.Trained
  result: classify.Evaluation
  report: Report
  _means: np.ndarray | None = None
  _xgb: baselines.XGBoost | None = None

  @property
  def out(self) -> pathlib.Path:
    path = self.workdir / "analysis"
    path.mkdir(parents=True, exist_ok=True)
    return path

  @property
  def means(self) -> np.ndarray:
    """[cells, K] raw mean marker intensity per cell of the store."""
    if self._means is None:
      self._means = expression_matrix(self.plan.store).to_numpy()
    return self._means

  @property
  def features(self) -> np.ndarray:
    with config_util.config_keys("baseline"):
      return baselines.features_from_means(self.means, self.config.baseline.cofactor)

  def fit_xgboost(self, train_idx: np.ndarray) -> baselines.XGBoost:
    b, plan = self.config.baseline, self.plan
    with config_util.config_keys("baseline", hierarchy="data.hierarchy"):
      return baselines.fit_xgboost(
          self.features[train_idx], plan.labels[train_idx], len(plan.classes),
          n_estimators=b.n_estimators, max_depth=b.max_depth, learning_rate=b.learning_rate,
          balance=b.balance, categories=parse_hierarchy(self.config.data.hierarchy, plan.classes),
          seed=self.config.seed)

  @property
  def xgb(self) -> baselines.XGBoost:
    if self._xgb is None:
      self._xgb = self.fit_xgboost(self.plan.train_idx)
    return self._xgb

  # ------------------------------------------------------------ sections

  def baseline_and_confidence(self) -> dict:
    plan, result, c = self.plan, self.result, self.config
    xgb_probs = self.xgb.predict_proba(self.features[result.index])
    table = baselines.predictions_from_probs(result.cells, plan.classes, xgb_probs)
    write_table(table, self.workdir / "predictions_xgboost.parquet")
    stats = classification.add_to_report(self.report, table, plan.classes,
                                         "XGBoost on expression features", prefix="xgb_")
    rows = _labelled_rows(result, plan.labels)
    if not len(rows):
      return {f"eval/xgb_{k}": v for k, v in stats.items()}
    member = c.confidence.member
    probs = {f"ensemble of {self.trained.members}": result.member_probs[rows].mean(axis=1),
             f"member {member}": result.member_probs[rows, member], "XGBoost": xgb_probs[rows]}
    y_true = plan.labels[result.index[rows]]
    thresholds = _thresholds(c)
    summary, curves = classification.add_comparison_to_report(self.report, y_true, probs,
                                                              plan.classes, thresholds)
    write_table(summary.rename_axis("model").reset_index(), self.out / "models.csv")
    recall = classification.recall_side_by_side(
        y_true, {n: p.argmax(axis=1) for n, p in probs.items()}, plan.classes)
    write_table(recall.rename_axis("class").reset_index(), self.out / "recall_by_class.csv")
    write_table(curves.reset_index(), self.out / "recall_coverage.csv")
    scalars = {f"eval/xgb_{k}": v for k, v in stats.items()}
    for name, key in zip(probs, ("ensemble", f"member{member}", "xgb")):
      scalars[f"eval/{key}_top2_accuracy"] = float(summary.loc[name, "top2_accuracy"])
    return scalars

  def saliency(self) -> dict:
    s, plan, result = self.config.saliency, self.plan, self.result
    rows = _labelled_rows(result, plan.labels)
    labels = plan.labels[result.index[rows]]
    correct = result.member_probs[rows].mean(axis=1).argmax(axis=1) == labels
    chosen = []
    for c in range(len(plan.classes)):
      # Correctly predicted cells first: the gradient then shows what the model relies on.
      of_class = np.flatnonzero(labels == c)
      of_class = of_class[np.argsort(~correct[of_class], kind="stable")]
      chosen.extend(of_class[:s.cells_per_class])
    if not chosen:
      self.report.paragraph("Saliency: no labelled held-out cells.")
      return {}
    trained = self.trained if s.member < 0 else self.trained.member(s.member)
    preprocess, _ = trained_lib.store_preprocess(trained, plan.store, scales=plan.scales)
    images = np.asarray(preprocess(_crops(plan.store, trained.crop_size, result.index[rows][chosen])))
    sal = saliency.compute(trained.model, trained.variables, images, labels[chosen], plan.classes,
                           plan.store.meta.channels, method=s.method, batch_size=s.batch_size)
    who = "the ensemble" if s.member < 0 else f"member {s.member}"
    radii = saliency.add_to_report(self.report, sal, s.heatmap_cells, title=f"Saliency of {who}")
    write_table(sal.marker_means.rename_axis("class").reset_index(), self.out / "saliency_markers.csv")
    write_table(radii.reset_index(), self.out / "saliency_radial.csv")
    return {}

  def simulations(self) -> dict:
    s, plan, result = self.config.simulate, self.plan, self.result
    if not (s.class_a and s.marker_a and s.class_b and s.marker_b):
      self.report.heading("Simulations")
      self.report.paragraph("Not run: set simulate.class_a, marker_a, class_b and marker_b.")
      return {}
    cfg = _simulation_config(self.config)
    channels = plan.store.meta.channels
    with config_util.config_keys("simulate"):
      simulate.check_names(cfg, plan.classes, channels)
    ca, cb = plan.classes.index(cfg.class_a), plan.classes.index(cfg.class_b)
    a, b = channels.index(cfg.marker_a), channels.index(cfg.marker_b)
    train = plan.train_idx
    area = plan.store.cells.area.to_numpy()
    with config_util.config_keys(**{"lambda": "simulate.lambda_a"}):
      total_a = simulate.typical_total(self.means[train, a], area[train], plan.labels[train], ca)
    with config_util.config_keys(**{"lambda": "simulate.lambda_b"}):
      total_b = simulate.typical_total(self.means[train, b], area[train], plan.labels[train], cb)
    rows = result.index[plan.labels[result.index] == ca]
    rows = np.sort(np.random.default_rng(cfg.seed).permutation(rows)[:cfg.cells])
    if not len(rows):
      self.report.heading("Simulations")
      self.report.paragraph(f"Not run: no held-out cells of class {cfg.class_a}.")
      return {}
    fn, _ = trained_lib.predictor(self.trained, plan.store, scales=plan.scales)
    batch = self.config.predict.batch_size
    scorers = {
        "CNN ensemble": lambda crops: trained_lib.predict_crops(
            self.trained, fn, crops, batch).mean(axis=1),
        "XGBoost": lambda crops: self.xgb.predict_proba(
            baselines.crop_features(crops, cofactor=self.config.baseline.cofactor)),
    }
    table = simulate.run(_crops(plan.store, self.trained.crop_size, rows), cfg, a, b, total_a,
                         total_b, scorers, ca, cb)
    write_table(table, self.out / "simulations.csv")
    return simulate.add_to_report(self.report, table, cfg)

  def learning_curve(self) -> dict:
    lc, plan = self.config.learning_curve, self.plan
    fov_names = plan.store.cells.fov_name.to_numpy()
    labelled = np.flatnonzero(np.isin(fov_names, plan.train_fovs) & (plan.labels >= 0))
    counts = np.bincount(plan.labels[labelled], minlength=len(plan.classes))
    val = self.result.index[plan.labels[self.result.index] >= 0]
    if not len(val):
      self.report.paragraph("Learning curve: no labelled held-out cells.")
      return {}
    runs = []
    with config_util.config_keys("learning_curve"):
      sizes = learning_curve.sizes_to_run(lc.sizes, counts[counts > 0])
    for n in sizes:
      for r in range(lc.repeats):
        sub = copy.deepcopy(self.config)
        sub.seed = self.config.seed + r
        sub.progress = False
        sub.ensemble.members = lc.members
        sub.data.max_per_class = n
        if lc.steps > 0:
          sub.train.steps = lc.steps
        idx = cap_per_class(labelled, plan.labels, n, sub.seed)
        sub_plan = plan.with_training_cells(sub, idx)
        run_dir = self.workdir / "learning_curve" / f"n{n}_r{r}"
        logging.info("learning curve: %d cells per class, repeat %d, %d steps", n, r, sub_plan.num_steps)
        writer = training.metric_writer(run_dir, tensorboard=False)
        try:
          model = classify.train(sub, run_dir, sub_plan, writer)
        finally:
          writer.close()
        _, probs, _ = trained_lib.predict_store(model, plan.store, val, scales=plan.scales,
                                                batch_size=self.config.predict.batch_size,
                                                threads=self.config.data.threads)
        y_true = plan.labels[val]
        xgb = self.fit_xgboost(idx).predict_proba(self.features[val])
        runs.append({"cells_per_class": n, "repeat": r, "training_cells": len(idx),
                     "cnn_balanced_recall": classification.balanced_recall(
                         y_true, probs.mean(axis=1).argmax(axis=1)),
                     "xgb_balanced_recall": classification.balanced_recall(y_true, xgb.argmax(axis=1))})
    runs = pd.DataFrame(runs)
    write_table(runs, self.out / "learning_curve.csv")
    learning_curve.add_to_report(self.report, runs)
    return {}

  def transfer(self) -> dict:
    t = self.config.transfer
    if t.synthetic:
      target = _synthetic_target(self.config, self.workdir)
    else:
      target = open_store(t.store)
    with config_util.config_keys("transfer"):
      stats = predict.predict_and_report(
          self.trained, target, None, self.workdir / "transfer", self.report,
          batch_size=self.config.predict.batch_size, threads=self.config.data.threads,
          min_overlap=t.min_overlap, renames=t.renames, csv=self.config.predict.cellsighter_csv,
          title=f"Transfer to {target.path}", prefix="transfer_")
    return {f"transfer/{k}": v for k, v in stats.items()}


def _synthetic_target(config, workdir: pathlib.Path) -> Store:
  """A new synthetic tissue (seed + 1) of another panel: channels dropped and order reversed."""
  settings = dict(config.data.synthetic.to_dict(), drop=config.transfer.drop_channels)

  def make(path):
    cfg = dataclasses.replace(synthetic.from_config(config.data.synthetic),
                              seed=config.data.synthetic.seed + 1)
    tissue = synthetic.generate(cfg)
    dropped = set(config_util.comma_list(config.transfer.drop_channels))
    keep = [k for k, c in enumerate(tissue.channels) if c not in dropped][::-1]
    tissue = dataclasses.replace(tissue, channels=tuple(tissue.channels[k] for k in keep),
                                 images=[image[keep] for image in tissue.images])
    return synthetic.write_store(tissue, path, chunk_size=config.data.chunk_size)

  return stores.derived_store(workdir, "transfer_store", settings, "transfer", make)


def _thresholds(config) -> list[float]:
  with config_util.config_keys():
    return config_util.comma_list(config.confidence.thresholds, float,
                                  field="confidence.thresholds")


def _simulation_config(config) -> simulate.SimulationConfig:
  s = config.simulate
  with config_util.config_keys("simulate"):
    floats = lambda name: config_util.comma_list(s[name], float, field=name)
    return simulate.SimulationConfig(
        class_a=s.class_a, marker_a=s.marker_a, class_b=s.class_b, marker_b=s.marker_b,
        lambda_a=s.lambda_a, lambda_b=s.lambda_b, membrane_width=s.membrane_width,
        patch_radius=s.patch_radius, blur_sigma=s.blur_sigma,
        border_distances=floats("border_distances"), fractions=floats("fractions"),
        centre_distances=floats("centre_distances"), cells=s.cells, repeats=s.repeats,
        seed=s.seed)


def _check(config) -> None:
  """Every value the analyses will read, and what they need installed, before the ensemble
  trains (the classify task's own keys first)."""
  c, check = config, config_util.check
  classify.validate(c)
  try:
    import xgboost  # noqa: F401  (the XGBoost baseline: an optional extra)
  except ImportError as e:
    raise ConfigError("baseline", f"the XGBoost baseline needs the xgboost package ({e})",
                      "pip install -e '.[xgboost]'") from None
  _thresholds(c)
  if c.simulate.enabled and c.simulate.class_a and c.simulate.marker_a and c.simulate.class_b \
      and c.simulate.marker_b:
    _simulation_config(c)
  if c.learning_curve.enabled:
    with config_util.config_keys("learning_curve"):
      learning_curve.sizes_to_run(c.learning_curve.sizes, np.array([1]))
  config_util.check_choice(c, "baseline.balance", baselines.BALANCE)
  config_util.check_choice(c, "saliency.method", saliency.METHODS)
  check(c.baseline.cofactor > 0, "baseline.cofactor", f"{c.baseline.cofactor}", "a positive cofactor")
  check(c.baseline.n_estimators >= 1 and c.baseline.max_depth >= 1, "baseline.n_estimators",
        f"n_estimators {c.baseline.n_estimators}, max_depth {c.baseline.max_depth}", "≥ 1 each")
  check(0 <= c.confidence.member < c.ensemble.members, "confidence.member", f"{c.confidence.member}",
        f"a member index below {c.ensemble.members}")
  check(-1 <= c.saliency.member < c.ensemble.members, "saliency.member", f"{c.saliency.member}",
        f"-1 (the ensemble) or a member index below {c.ensemble.members}")
  check(c.saliency.cells_per_class >= 1, "saliency.cells_per_class",
        f"{c.saliency.cells_per_class}", "≥ 1")
  check(c.learning_curve.repeats >= 1 and c.learning_curve.members >= 1, "learning_curve.repeats",
        f"repeats {c.learning_curve.repeats}, members {c.learning_curve.members}", "≥ 1 each")
  check(0 <= c.transfer.min_overlap <= 1, "transfer.min_overlap", f"{c.transfer.min_overlap}",
        "a fraction in [0, 1]")
  check(not (c.transfer.synthetic and c.data.source != "synthetic"), "transfer.synthetic",
        "needs data.source='synthetic'", "a synthetic run, or transfer.store")


def run(config, workdir) -> dict:
  _check(config)
  workdir = pathlib.Path(workdir)

  def analyses(plan, trained, result, report) -> dict:
    a = _Analyses(config, workdir, plan, trained, result, report)
    scalars = a.baseline_and_confidence()
    if config.saliency.enabled:
      scalars.update(a.saliency())
    if config.simulate.enabled:
      scalars.update(a.simulations())
    if config.learning_curve.enabled:
      scalars.update(a.learning_curve())
    if config.transfer.store or config.transfer.synthetic:
      scalars.update(a.transfer())
    return scalars

  return classify.run(config, workdir, extend=analyses, title="cellrep: CellSighter")
