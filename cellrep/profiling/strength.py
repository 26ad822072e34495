"""Treatment strength: how far a treatment's wells sit from their plate's controls.

Per plate, each well's Euclidean distance to the plate's median control profile is
z-scored against the control wells' own distances (mean and sample std over that
plate's controls); a treatment's strength is the mean z of its wells (the Cell
Painting CNN paper's proxy of the average treatment effect). Treatments are then
split into the weakest, median and strongest fractions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from cellrep.errors import InputError
from cellrep.profiling import aggregate, sphering, tables


@jax.jit
def _distances(x, centre):
  return jnp.sqrt(jnp.sum((x - centre) ** 2, axis=1))


def well_strength(wells: pd.DataFrame, controls, plate_col: str = "Metadata_Plate",
                  source: str = "wells") -> pd.DataFrame:
  """Metadata of every well with `control_distance` and `strength_z`."""
  tables.require_columns(wells, [plate_col], source, "plate")
  features = tables.feature_columns(wells)
  x = tables.feature_matrix(wells, features, source)
  is_ctl = sphering.control_mask(wells, controls, source)
  plate_ids, plates = aggregate.group_ids(wells, [plate_col])
  n_plates = len(plates)
  ctl_per_plate = np.bincount(plate_ids[is_ctl], minlength=n_plates)
  if (ctl_per_plate < 2).any():
    p = plates[plate_col].iloc[int(np.argmin(ctl_per_plate))]
    raise InputError(source, f"plate {p!r} has {int(ctl_per_plate.min())} control wells",
                     "at least 2 control wells per plate")
  ctl_rows = np.flatnonzero(is_ctl)
  med = aggregate.segment_median(x[ctl_rows], plate_ids[ctl_rows], n_plates)
  dist = np.asarray(_distances(jnp.asarray(x), jnp.asarray(med)[plate_ids]), np.float64)
  d_ctl = pd.Series(dist[is_ctl]).groupby(plate_ids[is_ctl])
  mu, sd = d_ctl.mean().to_numpy(), d_ctl.std(ddof=1).to_numpy()
  if (sd == 0).any():
    p = plates[plate_col].iloc[int(np.argmin(sd))]
    raise InputError(source, f"plate {p!r}: control wells are all equally far from their median",
                     "control wells that vary")
  out = wells[tables.metadata_columns(wells)].reset_index(drop=True).copy()
  out["control_distance"] = dist
  out["strength_z"] = (dist - mu[plate_ids]) / sd[plate_ids]
  out["is_control"] = is_ctl
  return out


def treatment_strength(wells: pd.DataFrame, controls, treatment_col: str,
                       plate_col: str = "Metadata_Plate", fraction: float = 0.2,
                       source: str = "wells") -> pd.DataFrame:
  """Per non-control treatment: `strength` (mean z of its wells), `n_wells`, and
  `strength_group` in {"weakest", "median", "strongest"} for the lowest, middle and
  highest `fraction` of treatments by strength ("" otherwise)."""
  tables.require_columns(wells, [treatment_col], source, "treatment")
  per_well = well_strength(wells, controls, plate_col, source)
  trt = per_well[~per_well["is_control"]]
  if not len(trt):
    raise InputError(source, "every well is a control", "treated wells besides the controls")
  out = (trt.groupby(treatment_col, observed=True)["strength_z"].agg(["mean", "size"])
         .rename(columns={"mean": "strength", "size": "n_wells"}).reset_index())
  out["strength_group"] = strength_groups(out["strength"].to_numpy(), fraction)
  return out.sort_values("strength", kind="stable").reset_index(drop=True)


def strength_groups(strength: np.ndarray, fraction: float = 0.2) -> np.ndarray:
  """"weakest" / "median" / "strongest" for the lowest, middle and highest
  `fraction` of values by rank, "" for the rest."""
  n = len(strength)
  k = max(1, int(round(fraction * n)))
  rank = np.empty(n, np.int64)
  rank[np.argsort(strength, kind="stable")] = np.arange(n)
  lo_mid = (n - k) // 2
  out = np.full(n, "", dtype=object)
  out[(rank >= lo_mid) & (rank < lo_mid + k)] = "median"
  out[rank < k] = "weakest"
  out[rank >= n - k] = "strongest"
  return out
