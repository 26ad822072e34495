"""The λ sweep gives one mAP per λ, each equal to a direct sphere-then-rank run."""

from __future__ import annotations

import numpy as np

from cellrep.profiling import retrieval, sphering, synthetic, sweep

RULES = (["Metadata_compound"], [], [], ["Metadata_compound"])


def test_sweep_matches_direct_runs():
  meta, x = synthetic.wells(dim=16, ties=False, signal=0.4, seed=8)
  df = synthetic.table(meta, x)
  out = sweep.lambda_sweep(df, "Metadata_control == True", [1e-2, 1.0], *RULES)
  assert list(out["reg"]) == [1e-2, 1.0]
  s = sphering.sphere(df, "Metadata_control == True", reg=1.0)
  feats = s[[c for c in s.columns if c.startswith("f")]].to_numpy()
  ap = retrieval.average_precision(s[list(meta.columns)], feats, *RULES)
  direct = ap.dropna(subset=["average_precision"]).groupby("Metadata_compound")[
      "average_precision"].mean().mean()
  assert np.isclose(out["mean_average_precision"].iloc[1], direct)
