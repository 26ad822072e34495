"""mAP p-values against copairs: equal for the same seed and null size ("copairs"
sampler); the same null distribution from another stream ("fast" sampler)."""

from __future__ import annotations

import numpy as np
import pytest
from copairs.compute import random_ap
from copairs.map import average_precision as copairs_ap
from copairs.map import mean_average_precision as copairs_map
from scipy import stats
from statsmodels.stats.multitest import multipletests

from cellrep.errors import InputError
from cellrep.profiling import significance, synthetic
from cellrep.profiling.retrieval import average_precision

RULES = (["Metadata_compound"], [], [], ["Metadata_compound"])
SAME_MOA = (["Metadata_moa"], ["Metadata_compound"], [], ["Metadata_moa"])


@pytest.fixture(scope="module")
def table():
  return synthetic.wells(signal=0.3, seed=4)


@pytest.mark.parametrize("rules, sameby", [(RULES, ["Metadata_compound"]),
                                           (SAME_MOA, ["Metadata_moa"])])
def test_copairs_sampler_gives_copairs_p_values(table, tmp_path, rules, sameby):
  meta, x = table
  ref_ap = copairs_ap(meta, x, *rules, progress_bar=False)
  # A fresh cache: copairs caches nulls by (n_pos, n_total) only, so a stale cache
  # from another configuration list would change its own answer.
  ref = copairs_map(ref_ap, sameby, null_size=2000, threshold=0.05, seed=7, progress_bar=False,
                    cache_dir=tmp_path)
  ours = significance.mean_average_precision(average_precision(meta, x, *rules), sameby,
                                             null_size=2000, threshold=0.05, seed=7,
                                             null_method="copairs")
  np.testing.assert_allclose(ours["mean_average_precision"], ref["mean_average_precision"],
                             rtol=0, atol=1e-6)
  np.testing.assert_array_equal(ours["p_value"], ref["p_value"])
  np.testing.assert_allclose(ours["corrected_p_value"], ref["corrected_p_value"], rtol=1e-12)
  np.testing.assert_array_equal(ours["below_corrected_p"], ref["below_corrected_p"])
  assert ours["indices"].tolist() == ref["indices"].tolist()


def test_copairs_null_is_bit_equal():
  for k, total, seed in [(1, 5, 0), (3, 40, 7), (12, 300, 99)]:
    np.testing.assert_array_equal(significance.copairs_null(k, total, 500, seed),
                                  random_ap(500, k, total, seed))


@pytest.mark.parametrize("k, total", [(1, 5), (3, 40), (30, 40), (10, 1000)])
def test_fast_null_has_copairs_distribution(k, total):
  fast = significance.fast_null(k, total, 20000, seed=1)
  ref = significance.copairs_null(k, total, 20000, seed=2)
  # Two independent samples of one distribution: a KS test should not reject.
  assert stats.ks_2samp(fast, ref).pvalue > 1e-3
  # The exact mean of a random ranking's AP (copairs' expected_ap), within 5 standard errors.
  from cellrep.profiling.retrieval import expected_ap
  mu = expected_ap(np.array([k]), np.array([total - k]))[0]
  assert abs(fast.mean() - mu) < 5 * fast.std() / np.sqrt(len(fast)) + 1e-7


def test_fast_p_values_agree_with_copairs_within_monte_carlo_error(table):
  meta, x = table
  ap = average_precision(meta, x, *RULES)
  n = 4000
  fast = significance.map_p_values(ap, ["Metadata_compound"], n, seed=3, null_method="fast")
  exact = significance.map_p_values(ap, ["Metadata_compound"], n, seed=3, null_method="copairs")
  p = exact["p_value"].to_numpy()
  # Two estimates of one probability from n samples each: 6 standard errors apart at most.
  se = np.sqrt(2 * np.maximum(p * (1 - p), 1 / n) / n)
  assert np.all(np.abs(fast["p_value"].to_numpy() - p) <= 6 * se + 2 / n)


def test_benjamini_hochberg_matches_statsmodels():
  p = np.random.default_rng(0).uniform(size=200) ** 3
  p[:5] = p[5]  # ties
  np.testing.assert_allclose(significance.benjamini_hochberg(p),
                             multipletests(p, method="fdr_bh")[1], rtol=1e-12)


def test_bad_input(table):
  meta, x = table
  ap = average_precision(meta, x, *RULES)
  with pytest.raises(InputError, match="Metadata_nope"):
    significance.mean_average_precision(ap, ["Metadata_nope"], 100, 0.05, 0)
  with pytest.raises(InputError, match="null_method"):
    significance.mean_average_precision(ap, ["Metadata_compound"], 100, 0.05, 0, null_method="x")
