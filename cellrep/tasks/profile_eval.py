"""The profile evaluation job: profiles -> sphered wells -> AP/mAP, enrichment, strength.

Reads `config.input` (see configs/profile_eval.py), aggregates cells or sites to
wells if needed, spheres the wells on their controls, then scores
- replicate retrieval: each treated well against its replicates and the controls
  (copairs' phenotypic activity), mAP and p-values per treatment;
- same-MoA retrieval between treatment profiles (mAP per MoA, interpolated mAP as
  in the Cell Painting CNN paper) and folds of enrichment;
- treatment strength (distance to the plate's controls, z-scored);
and writes parquet tables and report/index.html into WORKDIR. Every file is
written under a temporary name and renamed, so none is ever half-written.
"""

from __future__ import annotations

import pathlib

import ml_collections
import numpy as np
import pandas as pd
from absl import logging
from ml_collections import config_dict

from cellrep import config_util
from cellrep.config_util import comma_list
from cellrep.errors import InputError
from cellrep.files import write_table
from cellrep.eval.report import Report
from cellrep.profiling import (aggregate, enrichment, retrieval, significance, sphering, strength,
                               sweep, synthetic, tables)

REFERENCE = "Metadata_reference_index"
# The plate of every well when columns.plate is "" (data without plates, such as tissue).
ONE_PLATE = "Metadata_one_plate"


def default_config() -> ml_collections.ConfigDict:
  """Every key the job reads (configs/profile_eval.py adds its variants)."""
  config = ml_collections.ConfigDict()
  config.task = "profile_eval"
  config.input = config_dict.placeholder(str)  # profiles .parquet/.csv/.csv.gz (unless synthetic)
  config.synthetic = False                     # generate a well table instead of reading one
  config.level = "well"                        # rows of the input: "cell", "site" or "well"

  # Comma-separated column lists: the groups of each aggregation level.
  config.columns = columns = ml_collections.ConfigDict()
  columns.site = "Metadata_Plate,Metadata_Well,Metadata_Site"  # cells -> site (median)
  columns.well = "Metadata_Plate,Metadata_Well"                 # sites -> well (mean)
  columns.treatment = "Metadata_compound"                       # wells -> treatment (mean)
  columns.moa = "Metadata_moa"                                  # "" skips same-MoA retrieval
  columns.plate = "Metadata_Plate"                              # "" = all wells on one plate
  config.controls = "Metadata_control == True"  # pandas query selecting control wells

  config.sphering = sphering = ml_collections.ConfigDict()
  sphering.method = "ZCA"          # ZCA, PCA, ZCA-cor, PCA-cor; "none" skips sphering
  sphering.reg = 1e-2              # λ added to the eigenvalues
  sphering.knee = False            # λ = eigenvalue at the knee / 10 instead of `reg`
  sphering.epsilon = config_dict.placeholder(float)  # pycytominer's ε on singular values
                                   # (e.g. 1e-6, its default) instead of λ; unset = λ
  sphering.per_plate = False       # fit on each plate's own controls
  sphering.sweep = "1e-4,1e-3,1e-2,1e-1,1"  # λ values of the mAP-vs-λ plot; "" = none

  config.retrieval = retrieval = ml_collections.ConfigDict()
  retrieval.distance = "cosine"    # cosine, correlation or euclidean
  retrieval.null_size = 10000      # null samples per (positives, total) configuration
  retrieval.null_method = "fast"   # "fast", or "copairs" for copairs' exact random stream
  retrieval.seed = 0
  retrieval.threshold = 0.05       # significance level of corrected p-values
  retrieval.moa_sep = "|"          # separator of multi-label MoA strings
  retrieval.percentile = 99.0      # folds of enrichment threshold (per query)
  retrieval.memory_budget_mb = 512  # memory one block of the ranking may hold
  retrieval.strength_fraction = 0.2  # weakest / median / strongest fraction of treatments
  return config


def validate(config) -> None:
  config_util.check(bool(config.input) or config.synthetic, "input", "not set",
                    "a profiles .parquet/.csv/.csv.gz, e.g. --config.input=wells.parquet")
  config_util.check_choice(config, "level", ("cell", "site", "well"))
  config_util.check_choice(config, "sphering.method", sphering.METHODS + ("none",))
  config_util.check_choice(config, "retrieval.distance", ("cosine", "correlation", "euclidean"))
  config_util.check_choice(config, "retrieval.null_method", significance.NULL_METHODS)
  config_util.check(config.sphering.reg >= 0, "sphering.reg", f"{config.sphering.reg}",
                    "a non-negative λ")
  eps = config.sphering.epsilon
  if eps is not None:
    config_util.check(eps > 0, "sphering.epsilon", f"{eps}", "a positive ε (or unset)")
    config_util.check(not config.sphering.knee, "sphering.epsilon", "set with sphering.knee",
                      "one regularisation: epsilon (pycytominer's) or reg / knee")
  config_util.check(config.retrieval.null_size > 0, "retrieval.null_size",
                    f"{config.retrieval.null_size}", "a positive number of null samples")
  config_util.check(0 < config.retrieval.percentile < 100, "retrieval.percentile",
                    f"{config.retrieval.percentile}", "a percentile in (0, 100)")
  config_util.check(0 < config.retrieval.strength_fraction <= 1 / 3,
                    "retrieval.strength_fraction", f"{config.retrieval.strength_fraction}",
                    "a fraction in (0, 1/3]")
  config_util.check(config.retrieval.memory_budget_mb > 0, "retrieval.memory_budget_mb",
                    f"{config.retrieval.memory_budget_mb}", "a positive number of MiB")
  with config_util.config_keys("sphering"):
    comma_list(config.sphering.sweep, float, field="sweep")


# pandas infers these compressions from the name (pycytominer writes .csv.gz by default).
_COMPRESSED = (".gz", ".bz2", ".zip", ".xz", ".zst")
EXPECTED_TABLE = "a profiles .parquet, .csv or compressed .csv (.csv.gz, ...) file"


def read_profiles(path) -> pd.DataFrame:
  """A profile table in a format pycytominer writes: parquet, CSV, or CSV compressed."""
  path = pathlib.Path(path)
  if not path.exists():
    raise InputError(path, "does not exist", EXPECTED_TABLE)
  suffixes = [x.lower() for x in path.suffixes]
  is_csv = bool(suffixes) and (suffixes[-1] in (".csv", ".tsv") or (
      len(suffixes) > 1 and suffixes[-1] in _COMPRESSED and suffixes[-2] in (".csv", ".tsv")))
  try:
    if is_csv:
      sep = "\t" if ".tsv" in suffixes[-2:] else ","
      return pd.read_csv(path, sep=sep)  # compression from the suffix
    return pd.read_parquet(path)
  except Exception as e:  # pyarrow and pandas raise many types for unreadable files
    kind = "CSV" if is_csv else "parquet"
    raise InputError(path, f"cannot be read as {kind}: {' '.join(str(e).split())[:200]}",
                     EXPECTED_TABLE) from None


def load_wells(config, workdir: pathlib.Path) -> tuple[pd.DataFrame, str]:
  """The well-level table (with ONE_PLATE when columns.plate is "") and the name errors
  should use for it."""
  df, source = _wells(config)
  if not config.columns.plate:
    df[ONE_PLATE] = "all"
  return df, source


def _wells(config) -> tuple[pd.DataFrame, str]:
  if config.synthetic:
    meta, x = synthetic.wells(n_compounds=60, replicates=4, n_controls=48, dim=64, n_plates=4,
                              n_moas=8, ties=False, multilabel=True, signal=0.35)
    return synthetic.table(meta, x), "synthetic wells"
  source = str(config.input)
  df = read_profiles(config.input)
  c = config.columns
  if config.level == "cell":
    well = comma_list(c.well)
    levels = aggregate.aggregate_levels(df, comma_list(c.site), well, well,
                                        source=source)
    df = levels["well"]
  elif config.level == "site":
    df = aggregate.aggregate(df, comma_list(c.well), "mean", source=source)
  return df, source


def run(config, workdir: pathlib.Path) -> dict:
  validate(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  c, r, s = config.columns, config.retrieval, config.sphering
  wells, source = load_wells(config, workdir)
  plate = c.plate or ONE_PLATE
  needed = [c.treatment, plate] + ([c.moa] if c.moa else [])
  tables.require_columns(wells, needed, source, "metadata")
  features = tables.feature_columns(wells)
  tables.feature_matrix(wells, features, source)  # refuse NaN / text features here
  controls = sphering.control_mask(wells, config.controls, source)
  # pycytominer's ε on singular values replaces λ on eigenvalues when set.
  reg = 0.0 if s.epsilon is not None else ("knee" if s.knee else s.reg)
  by = plate if s.per_plate else None
  if s.method != "none":
    wells = sphering.sphere(wells, controls, s.method, reg=reg, epsilon=s.epsilon, by=by,
                            source=source)
    features = tables.feature_columns(wells)
  write_table(wells, workdir / "profiles.parquet")  # the well profiles as scored
  wells[REFERENCE] = np.where(controls, np.arange(len(wells)), -1)
  meta, x = wells[tables.metadata_columns(wells)], wells[features].to_numpy(np.float32)
  budget = int(r.memory_budget_mb) << 20

  # Replicate retrieval against controls (copairs' phenotypic activity).
  activity_rules = ([c.treatment, REFERENCE], [], [], [c.treatment, REFERENCE])
  ap = retrieval.average_precision(meta, x, *activity_rules, distance=r.distance,
                                   memory_budget=budget, source=source)
  ap = ap[~controls].reset_index(drop=True)
  maps = significance.mean_average_precision(ap, [c.treatment], r.null_size, r.threshold,
                                             r.seed, null_method=r.null_method, source=source)
  write_table(ap.drop(columns=[REFERENCE]), workdir / "ap.parquet")
  write_table(maps.drop(columns=["indices"]), workdir / "map.parquet")
  summary = {"wells": len(wells), "control wells": int(controls.sum()),
             "treatments": int(maps.shape[0]), "features": len(features),
             "sphering": s.method, "λ": reg if isinstance(reg, str) else float(reg),
             **({} if s.epsilon is None else {"ε (pycytominer)": float(s.epsilon)}),
             "activity mAP (mean over treatments)": float(maps.mean_average_precision.mean()),
             "fraction of treatments retrieved (corrected p < threshold)":
                 float(maps.below_corrected_p.mean())}

  moa_map = enrich = None
  if c.moa:
    trt = aggregate.aggregate(wells[~controls].drop(columns=[REFERENCE]), [c.treatment], "mean",
                              source=source)
    tables.require_columns(trt, [c.moa], source, "MoA (constant within a treatment)")
    t_meta, t_x = trt[tables.metadata_columns(trt)], trt[tables.feature_columns(trt)].to_numpy()
    multilabel = t_meta[c.moa].astype(str).str.contains(r.moa_sep, regex=False).any()
    moa_ap = retrieval.average_precision(
        t_meta, t_x, [c.moa], [c.treatment], [], [c.moa], distance=r.distance,
        multilabel_col=c.moa if multilabel else None, multilabel_sep=r.moa_sep,
        interpolated=True, memory_budget=budget, source=source)
    moa_map = significance.mean_average_precision(moa_ap, [c.moa], r.null_size, r.threshold,
                                                  r.seed, null_method=r.null_method,
                                                  source=source)
    enrich = enrichment.enrichment(t_meta, t_x, c.moa, r.percentile, r.distance, r.moa_sep,
                                   source=source)
    write_table(moa_ap, workdir / "moa_ap.parquet")
    write_table(moa_map.drop(columns=["indices"]), workdir / "moa_map.parquet")
    write_table(enrich, workdir / "enrichment.parquet")
    summary.update({
        "MoA mAP (mean over MoAs)": float(moa_map.mean_average_precision.mean()),
        "MoA interpolated mAP (paper)": float(moa_ap.interpolated_average_precision.mean()),
        f"folds of enrichment (top {100 - r.percentile:g}%)": float(enrich.folds.mean())})

  strong = strength.treatment_strength(wells.drop(columns=[REFERENCE]), controls, c.treatment,
                                       plate, r.strength_fraction, source=source)
  write_table(strong, workdir / "strength.parquet")
  by_strength = strong.merge(maps[[c.treatment, "mean_average_precision"]], on=c.treatment)
  for group in ("weakest", "median", "strongest"):
    chosen = by_strength[by_strength.strength_group == group]
    if len(chosen):
      summary[f"activity mAP, {group} {r.strength_fraction:.0%} of treatments"] = float(
          chosen.mean_average_precision.mean())

  regs = comma_list(s.sweep, float) if s.method != "none" else []
  lam = None
  if regs:
    raw, _ = load_wells(config, workdir)
    raw[REFERENCE] = np.where(controls, np.arange(len(raw)), -1)
    lam = sweep.lambda_sweep(raw, controls, regs, *activity_rules, method=s.method, by=by,
                             distance=r.distance, source=source)
    write_table(lam, workdir / "lambda_sweep.parquet")
  _report(workdir, summary, maps, moa_map, lam, strong)
  logging.info("profile_eval: %s", summary)
  return summary


def _report(workdir, summary, maps, moa_map, lam, strong) -> None:
  import matplotlib.pyplot as plt

  report = Report(workdir / "report", title="Profile evaluation")
  report.heading("Summary")
  report.key_values(summary)
  if lam is not None and len(lam):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.semilogx(lam["reg"], lam["mean_average_precision"], "o-")
    ax.set_xlabel("sphering λ")
    ax.set_ylabel("replicate mAP")
    ax.grid(alpha=0.3)
    report.figure(fig, "map_vs_lambda", "Replicate mAP against controls, per sphering λ")
  report.heading("Treatments (replicate retrieval)")
  cols = [col for col in maps.columns if col != "indices"]
  report.table(maps[cols].sort_values("mean_average_precision", ascending=False).head(30))
  if moa_map is not None:
    report.heading("MoAs (same-MoA retrieval between treatments)")
    report.table(moa_map[[col for col in moa_map.columns if col != "indices"]])
  report.heading("Treatment strength")
  report.table(strong[strong.strength_group != ""])
  report.write()
