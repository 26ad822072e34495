"""Folds of enrichment against the Cell Painting CNN paper's per-query computation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from cellrep.errors import InputError
from cellrep.profiling import aggregate, enrichment, synthetic


def paper_enrichment(similarities, moa_matches, percentile):
  """The paper's code: a 2x2 table at the query's percentile, one-sided Fisher."""
  threshold = np.percentile(similarities, percentile)
  above = similarities > threshold
  v = np.array([[np.sum(above & moa_matches), np.sum(above & ~moa_matches)],
                [np.sum(~above & moa_matches), np.sum(~above & ~moa_matches)]])
  odds, p = scipy.stats.fisher_exact(v, alternative="greater")
  return (v[1, 1] if np.isinf(odds) else odds), p, threshold


@pytest.fixture(scope="module")
def treatments():
  meta, x = synthetic.wells(n_compounds=63, multilabel=True, ties=False, signal=0.5, seed=5)
  df = synthetic.table(meta, x)
  return aggregate.aggregate(df[~df["Metadata_control"]], ["Metadata_compound", "Metadata_moa"],
                             "mean")


@pytest.mark.parametrize("percentile", [99.0, 90.0])
def test_matches_paper(treatments, percentile):
  feats = treatments[[c for c in treatments.columns if c.startswith("f")]].to_numpy()
  ours = enrichment.enrichment(treatments, feats, "Metadata_moa", percentile)
  xn = feats / np.linalg.norm(feats, axis=1, keepdims=True)
  sim = xn.astype(np.float64) @ xn.T.astype(np.float64)
  labels = [set(m.split("|")) for m in treatments["Metadata_moa"]]
  match = np.array([[bool(a & b) for b in labels] for a in labels])
  ref = [paper_enrichment(sim[i, np.arange(len(sim)) != i], match[i, np.arange(len(sim)) != i],
                          percentile) for i in range(len(sim)) if match[i].sum() > 1]
  assert len(ours) == len(ref)
  np.testing.assert_allclose(ours["folds"], [r[0] for r in ref], rtol=1e-12)
  np.testing.assert_allclose(ours["p_value"], [r[1] for r in ref], rtol=1e-9)
  np.testing.assert_allclose(ours["threshold"], [r[2] for r in ref], atol=1e-6)
  assert enrichment.folds_of_enrichment(treatments, feats, "Metadata_moa", percentile) == \
      pytest.approx(np.mean([r[0] for r in ref]))


def test_bad_input(treatments):
  feats = treatments[[c for c in treatments.columns if c.startswith("f")]].to_numpy()
  with pytest.raises(InputError, match="Metadata_target"):
    enrichment.enrichment(treatments, feats, "Metadata_target")
