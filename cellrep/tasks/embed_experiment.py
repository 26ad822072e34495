"""The embed job's batch experiment (Microsnoop's, Xun et al. 2024): the FOV rows of an embed
run sphered per plate on its control FOVs and averaged per treatment, scored by NSC / NSCB.

  FOV rows (a row per FOV: its Metadata_ columns and the features)
  -> per plate, ZCA-cor on that plate's controls (`embed.controls`), λ = knee / 10
     (`cellrep.profiling.aggregate.batch_experiment_profiles`) -> a mean per `embed.treatment`
  -> treatment_profiles.parquet; with `embed.moa`, NSC and NSCB of the treatments but the
     controls' (`cellrep.eval.probes.nsc_nscb`) -> scores.json

Its keys and columns are checked (`check_config`, `experiment_controls`) before anything is
embedded.
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pandas as pd
from absl import logging

from cellrep import config_util, files
from cellrep.data.store import Store
from cellrep.errors import ConfigError, InputError
from cellrep.eval import probes
from cellrep.profiling import aggregate, sphering

PROFILES = "treatment_profiles.parquet"
SCORES = "scores.json"
COLUMNS = ("plate", "treatment", "moa", "compound", "batch")  # embed.<key>: column names


def check_config(config) -> None:
  """embed.<COLUMNS> name Metadata_ columns (moa, compound, batch may be ""), and
  embed.controls is a query."""
  check, embed = config_util.check, config.embed
  for key in COLUMNS:
    value = embed[key]
    check((not value and key not in ("plate", "treatment")) or value.startswith("Metadata_"),
          f"embed.{key}", f"{value!r}", "a Metadata_ column of the store"
          + ("" if key in ("plate", "treatment") else ", or \"\""))
  check(bool(embed.controls.strip()), "embed.controls", "empty",
        "a pandas query selecting the control FOVs, e.g. Metadata_compound == 'DMSO'")


def _control_treatments(fovs: pd.DataFrame, treatment: str, controls: np.ndarray) -> set:
  """Treatments whose every FOV is a control (DMSO): profiled, never scored."""
  return set(fovs[treatment][controls]) - set(fovs[treatment][~controls])


def experiment_controls(config, fovs: pd.DataFrame, store: Store) -> np.ndarray:
  """The control FOVs [F] bool of the batch experiment, its columns checked on the FOV rows
  (`embed.fov_identity`) before any embedding."""
  embed, check = config.embed, config_util.check
  for key in COLUMNS:
    col = embed[key]
    check(not col or col in store.cells.columns, f"embed.{key}",
          f"no column {col!r} in {store.path}",
          f"one of {[c for c in store.cells.columns if c.startswith('Metadata_')]}")
    check(not col or col in fovs.columns, f"embed.{key}",
          f"{col!r} is not constant within each FOV", "a per-FOV column")
  try:
    controls = sphering.control_mask(fovs, embed.controls, str(store.path))
  except InputError as e:
    raise ConfigError("embed.controls", e.problem, e.expected) from None
  per_plate = pd.Series(controls).groupby(fovs[embed.plate].to_numpy()).sum()
  for plate, n in per_plate[per_plate < 2].items():
    raise ConfigError("embed.controls", f"{embed.plate} {plate!r} has {n} control FOVs",
                      "at least 2 control FOVs on every plate (each is sphered on its own)")
  scored = fovs[~fovs[embed.treatment].isin(_control_treatments(fovs, embed.treatment, controls))]
  for key in ("moa", "compound", "batch") if embed.moa else ():
    col = embed[key]
    check(not col or scored.groupby(embed.treatment)[col].nunique(dropna=False).le(1).all(),
          f"embed.{key}", f"{col!r} varies within a treatment ({embed.treatment})",
          "one value per treatment (controls aside)")
  return controls


def nsc_nscb(config, profiles: pd.DataFrame, fovs: pd.DataFrame, controls: np.ndarray,
             names) -> dict:
  """NSC and NSCB of the treatment profiles but the controls': the MoA of each one's nearest
  profile of another compound (and batch); MoA, compound and batch from its FOVs."""
  embed = config.embed
  treatment, compound, batch = embed.treatment, embed.compound or embed.treatment, embed.batch
  control = _control_treatments(fovs, treatment, controls)
  labels = fovs[~fovs[treatment].isin(control)]
  if not batch and (labels.groupby(treatment)[embed.plate].nunique(dropna=False) > 1).any():
    logging.warning("NSCB not scored: treatments span several %s values", embed.plate)
  else:
    batch = batch or embed.plate
  labels = labels.drop_duplicates(treatment).set_index(treatment, drop=False)
  scored = profiles[~profiles[treatment].isin(control)].reset_index(drop=True)
  out = {"treatments_scored": len(scored), "control_treatments": sorted(map(str, control)),
         "batch": batch or None}
  if len(scored):
    at = labels.loc[scored[treatment]]
    got = probes.nsc_nscb(scored[list(names)].to_numpy(), at[embed.moa].to_numpy(),
                          at[compound].to_numpy(), at[batch].to_numpy() if batch else None)
    out.update({k: v for k, v in got.items() if not k.endswith("_neighbour")})
  return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


def batch_experiment(config, workdir: pathlib.Path, table: pd.DataFrame, controls, names,
                     source: str) -> dict:
  """Writes treatment_profiles.parquet from `table` (a row per FOV: its Metadata_ columns and
  the features `names`; `source` names it in errors), and scores.json with embed.moa;
  returns the summary's lines."""
  embed = config.embed
  with config_util.config_keys("embed"):
    profiles = aggregate.batch_experiment_profiles(
        table, names, plate=embed.plate, treatment=embed.treatment, controls=controls,
        source=source)
  files.write_table(profiles, workdir / PROFILES)
  out = {"treatments": len(profiles), "treatment profiles": str(workdir / PROFILES)}
  if embed.moa:
    scores = nsc_nscb(config, profiles, table, controls, names)
    files.write_text(workdir / SCORES, json.dumps(scores, indent=1) + "\n")
    out.update({k: scores.get(k, "not scored") for k in ("nsc", "nscb")})
  return out
