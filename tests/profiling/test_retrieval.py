"""average_precision against copairs on generated tables: every AP equal to 1e-6."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from copairs.map import average_precision as copairs_ap
from copairs.map import multilabel as copairs_multilabel

from cellrep.errors import InputError
from cellrep.profiling import pairs, ranking, synthetic
from cellrep.profiling.retrieval import average_precision

ATOL = 1e-6  # the tolerance; observed differences are ~1e-16 (float64 AP from ranks)

REPLICATES = (["Metadata_compound"], [], [], ["Metadata_compound"])
SAME_MOA = (["Metadata_moa"], ["Metadata_compound"], [], ["Metadata_moa"])
PLATES = (["Metadata_compound"], ["Metadata_Plate"], ["Metadata_Plate"], ["Metadata_compound"])
# A pair can be positive and negative at once: copairs lists it twice.
OVERLAP = (["Metadata_compound"], [], [], ["Metadata_Plate"])


def assert_same(ours: pd.DataFrame, ref: pd.DataFrame) -> None:
  assert list(ours.columns) == list(ref.columns)
  assert len(ours) == len(ref)
  for col in ("n_pos_pairs", "n_total_pairs"):
    np.testing.assert_array_equal(ours[col].to_numpy(np.int64), ref[col].to_numpy(np.int64))
  for col in ("average_precision", "normalized_average_precision"):
    np.testing.assert_allclose(ours[col], ref[col], rtol=0, atol=ATOL, equal_nan=True)


@pytest.fixture(scope="module")
def table():
  return synthetic.wells()


@pytest.mark.parametrize("distance", ["cosine", "correlation", "euclidean"])
@pytest.mark.parametrize("rules", [REPLICATES, SAME_MOA, PLATES, OVERLAP],
                         ids=["replicates", "same_moa", "plates", "overlap"])
def test_matches_copairs(table, rules, distance):
  meta, x = table
  ref = copairs_ap(meta, x, *rules, distance=distance, progress_bar=False)
  ours = average_precision(meta, x, *rules, distance=distance)
  assert_same(ours, ref)


def test_ties_and_rows_without_positives(table):
  meta, x = table
  ours = average_precision(meta, x, *REPLICATES)
  # The single-well compound has no positive: NaN, as copairs.
  sizes = meta["Metadata_compound"].map(meta["Metadata_compound"].value_counts())
  lonely = (sizes == 1).to_numpy()
  assert lonely.any() and ours.loc[lonely, "n_pos_pairs"].eq(0).all()
  assert ours.loc[lonely, "average_precision"].isna().all()
  # Rows 1 and 3 are copies: one is the other's nearest neighbour at equal similarity.
  np.testing.assert_array_equal(x[1], x[3])


def test_exact_tie_ranks_positive_first():
  # Query 0: positive 1 and negative 2 at the same similarity; positive must rank first.
  meta = pd.DataFrame({"Metadata_g": ["a", "a", "b", "b"]})
  x = np.array([[1, 0], [1, 1], [1, 1], [0, 1]], np.float32)
  ours = average_precision(meta, x, ["Metadata_g"], [], [], ["Metadata_g"])
  ref = copairs_ap(meta, x, ["Metadata_g"], [], [], ["Metadata_g"], progress_bar=False)
  assert ours["average_precision"].iloc[0] == 1.0
  assert_same(ours, ref)


def test_n_smaller_than_d():
  meta, x = synthetic.wells(n_compounds=10, replicates=3, n_controls=6, dim=200, seed=3)
  ref = copairs_ap(meta, x, *SAME_MOA, progress_bar=False)
  assert_same(average_precision(meta, x, *SAME_MOA), ref)


def test_multilabel_matches_copairs():
  meta, x = synthetic.wells(multilabel=True, ties=False, seed=1)
  listed = meta.assign(Metadata_moa=meta["Metadata_moa"].str.split("|"))
  ref = copairs_multilabel.average_precision(listed, x, *SAME_MOA, multilabel_col="Metadata_moa",
                                             progress_bar=False)
  ours = average_precision(meta, x, *SAME_MOA, multilabel_col="Metadata_moa")
  key = ["Metadata_Well", "Metadata_moa"]
  ref = ref.sort_values(key).reset_index(drop=True)
  ours = ours.sort_values(key).reset_index(drop=True)
  pd.testing.assert_frame_equal(ours[key], ref[key])
  assert_same(ours, ref)


def test_query_filter_equals_filtered_table(table):
  meta, x = table
  keep = ~meta["Metadata_control"].to_numpy()
  ours = average_precision(meta, x, ["Metadata_moa", "Metadata_control == False"],
                           ["Metadata_compound"], [], ["Metadata_moa"])
  ref = copairs_ap(meta[keep].reset_index(drop=True), x[keep], *SAME_MOA, progress_bar=False)
  assert_same(ours, ref)


def test_blocks_and_device_sort_agree(table):
  meta, x = table
  rules = pairs.build_rules(meta, *SAME_MOA)
  whole = ranking.rank_queries(x, rules)
  small = ranking.rank_queries(x, rules, max_block_rows=8, memory_budget=1 << 16)
  device = ranking.rank_queries(x, rules, host_sort=False, max_block_rows=16)
  np.testing.assert_array_equal(whole.ap, small.ap)
  np.testing.assert_array_equal(whole.ap, device.ap)


def _interpolated_reference(sim: np.ndarray, match: np.ndarray, points: int) -> float:
  """Precision interpolated as the max over higher recall, from an explicit ranking."""
  order = np.argsort(-sim, kind="stable")
  rel = match[order]
  tp = np.cumsum(rel)
  prec, rec = tp / np.arange(1, len(rel) + 1), tp / rel.sum()
  grid = np.linspace(0, 1, points)
  return float(np.mean([prec[rec >= g].max() for g in grid]))


def test_interpolated_ap_matches_reference():
  meta, x = synthetic.wells(ties=False, seed=2)
  ours = average_precision(meta, x, *SAME_MOA, interpolated=True, recall_points=11)
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  sim = xn.astype(np.float64) @ xn.T.astype(np.float64)
  moa, cpd = meta["Metadata_moa"].to_numpy(), meta["Metadata_compound"].to_numpy()
  for i in np.flatnonzero(ours["n_pos_pairs"] > 0)[:40]:
    cand = (np.arange(len(meta)) != i) & ((moa != moa[i]) | (cpd != cpd[i]))
    match = (moa[cand] == moa[i]) & (cpd[cand] != cpd[i])
    ref = _interpolated_reference(sim[i, cand], match, 11)
    assert abs(ours["interpolated_average_precision"].iloc[i] - ref) < 1e-6


def test_bad_input_is_one_clear_error(table):
  meta, x = table
  bad = x.copy()
  bad[5, 2] = np.nan
  with pytest.raises(InputError, match="NaN"):
    average_precision(meta, bad, *REPLICATES)
  with pytest.raises(InputError, match="Metadata_nope.*does not exist"):
    average_precision(meta, x, ["Metadata_nope"], [], [], ["Metadata_compound"])
  with pytest.raises(InputError, match="at least 2 rows"):
    average_precision(meta.iloc[:1], x[:1], *REPLICATES)
  with pytest.raises(InputError, match="no positive pairs"):
    average_precision(meta, x, ["Metadata_Well"], [], [], ["Metadata_compound"])
