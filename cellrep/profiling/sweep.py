"""mAP as a function of the sphering regulariser λ, for the "mAP vs λ" plot."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from cellrep.profiling import retrieval, sphering, tables


def lambda_sweep(df: pd.DataFrame, controls, regs: Sequence[float], pos_sameby, pos_diffby,
                 neg_sameby, neg_diffby, method: str = "ZCA", by: str | None = None,
                 distance: str = "cosine", source: str = "profiles") -> pd.DataFrame:
  """One row per λ: `reg`, `mean_average_precision` (mean over pos_sameby groups of
  their mean AP) and `n_queries` (rows with an AP).

  Each λ spheres `df` on its `controls` (per `by` group if given) and ranks the
  result with the pair rules of `average_precision`.
  """
  rows = []
  group = [c for c in ([pos_sameby] if isinstance(pos_sameby, str) else list(pos_sameby))
           if c in df.columns]
  for reg in regs:
    sphered = sphering.sphere(df, controls, method=method, reg=float(reg), by=by, source=source)
    feats = sphered[tables.feature_columns(sphered)].to_numpy(np.float32)
    meta = sphered[tables.metadata_columns(sphered)]
    ap = retrieval.average_precision(meta, feats, pos_sameby, pos_diffby, neg_sameby,
                                     neg_diffby, distance=distance, source=source)
    scored = ap[ap["average_precision"].notna()]
    m = (scored.groupby(group, observed=True)["average_precision"].mean().mean() if group
         else scored["average_precision"].mean())
    rows.append({"reg": float(reg), "mean_average_precision": float(m),
                 "n_queries": int(len(scored))})
  return pd.DataFrame(rows)
