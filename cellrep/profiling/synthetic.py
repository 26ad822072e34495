"""Generated profile tables with replicate, MoA, plate and control structure.

Used by the tests (against copairs and pycytominer), the benchmark and the
`profile_eval` demo, so that all three see the same kind of data.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def wells(n_compounds: int = 24, replicates: int = 4, n_controls: int = 16, dim: int = 32,
          n_plates: int = 4, n_moas: int = 6, ties: bool = True, multilabel: bool = False,
          signal: float = 1.0, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
  """(meta, feats [rows, dim] float32) of well profiles.

  meta: Metadata_compound ("DMSO" for controls), Metadata_moa ("a|b" for some
  compounds when `multilabel`), Metadata_Plate, Metadata_control, Metadata_Well.
  Compounds carry their MoA's signal and their own; controls are noise. With
  `ties`, some rows are exact copies (equal similarities to every query) and the
  last compound has one well (a row without positives).
  """
  rng = np.random.default_rng(seed)
  moa_names = [f"moa{i}" for i in range(n_moas)]
  rows = []
  for c in range(n_compounds):
    moa = moa_names[c % n_moas]
    if multilabel and c % 5 == 0:
      moa = f"{moa}|{moa_names[(c + 1) % n_moas]}"
    reps = 1 if (ties and c == n_compounds - 1) else replicates
    for r in range(reps):
      rows.append((f"cpd{c}", moa, f"P{(c + r) % n_plates}", False))
  for k in range(n_controls):
    rows.append(("DMSO", "control", f"P{k % n_plates}", True))
  meta = pd.DataFrame(rows, columns=["Metadata_compound", "Metadata_moa", "Metadata_Plate",
                                     "Metadata_control"])
  meta["Metadata_Well"] = [f"W{i:04d}" for i in range(len(meta))]
  moa_signal = {m: rng.normal(size=dim) for m in moa_names}
  cpd_signal = {c: rng.normal(size=dim) for c in meta["Metadata_compound"].unique()}
  plate_shift = {p: rng.normal(size=dim) * 0.3 for p in meta["Metadata_Plate"].unique()}
  x = np.stack([
      plate_shift[plate] + rng.normal(size=dim) * 1.2 + (0.0 if ctl else signal * (
          0.8 * sum(moa_signal[m] for m in moa.split("|")) + cpd_signal[cpd]))
      for cpd, moa, plate, ctl in zip(meta["Metadata_compound"], meta["Metadata_moa"],
                                      meta["Metadata_Plate"], meta["Metadata_control"])
  ]).astype(np.float32)
  if ties:
    x[3] = x[1]
    x[-1] = x[-2]
    x[10] = x[-3]
  return meta, x


def table(meta: pd.DataFrame, feats: np.ndarray, prefix: str = "f") -> pd.DataFrame:
  """meta and features side by side, features named f0, f1, ..."""
  cols = pd.DataFrame(feats, columns=[f"{prefix}{i}" for i in range(feats.shape[1])])
  return pd.concat([meta.reset_index(drop=True), cols], axis=1)


def cells(n_compounds: int = 12, replicates: int = 3, n_controls: int = 8, sites: int = 2,
          cells_per_site: int = 5, dim: int = 16, n_plates: int = 2, n_moas: int = 4,
          seed: int = 0) -> pd.DataFrame:
  """A single-cell table: every well of `wells` split into sites of noisy cells."""
  meta, x = wells(n_compounds, replicates, n_controls, dim, n_plates, n_moas, ties=False,
                  seed=seed)
  rng = np.random.default_rng(seed + 1)
  reps = sites * cells_per_site
  m = meta.loc[meta.index.repeat(reps)].reset_index(drop=True)
  m["Metadata_Site"] = np.tile(np.repeat(np.arange(sites), cells_per_site), len(meta))
  f = np.repeat(x, reps, axis=0) + rng.normal(size=(len(m), dim)).astype(np.float32)
  return table(m, f.astype(np.float32))
