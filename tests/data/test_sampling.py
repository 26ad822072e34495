import pickle

import numpy as np
import pytest

from cellrep.data.sampling import (EpochSampler, cap_per_class, median_group_size, parse_hierarchy,
                                   sample_weights, split_fovs)
from cellrep.errors import BadValue


def test_split_fovs_explicit_fraction_and_single():
  fovs = [f"f{i}" for i in range(10)]
  assert split_fovs(fovs, ["f3", "f1"]) == ([f for f in fovs if f not in ("f1", "f3")], ["f1", "f3"])
  train, val = split_fovs(fovs, val_fraction=0.3, seed=1)
  assert len(val) == 3 and not set(train) & set(val) and set(train) | set(val) == set(fovs)
  assert split_fovs(fovs, val_fraction=0.3, seed=1) == (train, val)
  assert split_fovs(["only"]) == (["only"], ["only"])
  with pytest.raises(BadValue, match="unknown FOVs"):
    split_fovs(fovs, ["nope"])


def test_split_fovs_with_training_fovs():
  fovs = ["a", "b", "c"]
  assert split_fovs(fovs, ["c"], train_fovs=["b", "a"]) == (["a", "b"], ["c"])
  assert split_fovs(fovs, train_fovs=["a"]) == (["a"], ["b", "c"])
  # CellSighter's example: one image, trained on and validated on.
  assert split_fovs(fovs, ["a"], train_fovs=["a"]) == (["a"], ["a"])
  assert split_fovs(fovs, train_fovs=fovs) == (fovs, fovs)
  with pytest.raises(BadValue, match="train_fovs"):
    split_fovs(fovs, train_fovs=["z"])


def test_parse_hierarchy():
  assert parse_hierarchy("", ["x"]) is None
  assert parse_hierarchy("CD4 T=T; CD8 T = T;B=B", ["B", "CD4 T", "CD8 T"]) == {0: "B", 1: "T", 2: "T"}
  with pytest.raises(BadValue, match="without a category"):
    parse_hierarchy("B=B", ["B", "T"])
  with pytest.raises(BadValue, match="has no '='"):
    parse_hierarchy("B", ["B"])


def test_cap_per_class():
  labels = np.array([0] * 50 + [1] * 5 + [2] * 20)
  kept = cap_per_class(np.arange(75), labels, 10, seed=0)
  assert np.bincount(labels[kept]).tolist() == [10, 5, 10]
  assert cap_per_class(np.arange(75), labels, 0) is not None


def test_weights_balance_classes_and_hierarchy():
  labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
  w = sample_weights(labels, "class")
  per_class = [w[labels == c].sum() for c in range(3)]
  np.testing.assert_allclose(per_class, per_class[0])
  # Classes 1 and 2 form one lineage: the two lineages get equal total weight.
  w = sample_weights(labels, "hierarchy", {0: "A", 1: "B", 2: "B"})
  np.testing.assert_allclose(w[labels == 0].sum(), w[labels > 0].sum())
  np.testing.assert_allclose(sample_weights(labels, "none"), 1.0)
  with pytest.raises(BadValue):
    sample_weights(labels, "hierarchy")


def test_epoch_sampler_balanced_deterministic_random_access():
  labels = np.array([0] * 900 + [1] * 100)
  indices = np.arange(1000)
  s = EpochSampler(indices, 5000, seed=3, weights=sample_weights(labels))
  draws = np.array([s[i] for i in range(5000)])
  frac = np.mean(labels[draws] == 1)
  assert 0.45 < frac < 0.55  # balanced in expectation; 5000 draws, sd ≈ 0.007
  # Reading backwards or after pickling gives the same items.
  s2 = pickle.loads(pickle.dumps(s))
  assert [s2[i] for i in range(4999, 2999, -1)] == draws[3000:][::-1].tolist()
  # Epochs differ.
  assert not np.array_equal(draws[:1000], draws[1000:2000])
  with pytest.raises(IndexError):
    s[5000]


def test_unweighted_epochs_are_permutations():
  s = EpochSampler(np.arange(10, 20), 30, seed=0)
  for e in range(3):
    assert sorted(s[i] for i in range(10 * e, 10 * e + 10)) == list(range(10, 20))


def test_fov_local_order_keeps_each_epochs_draws_and_groups_fovs():
  labels = np.array([0] * 900 + [1] * 100)
  fovs = np.arange(1000) % 10
  weights = sample_weights(labels)
  plain = EpochSampler(np.arange(1000), 3000, seed=3, weights=weights)
  local = EpochSampler(np.arange(1000), 3000, seed=3, weights=weights, fovs=fovs, fov_window=2)
  for e in range(3):
    a = np.array([plain[i] for i in range(1000 * e, 1000 * e + 1000)])
    b = np.array([local[i] for i in range(1000 * e, 1000 * e + 1000)])
    # The same cells as the globally shuffled epoch (so the same class balance), reordered.
    np.testing.assert_array_equal(np.sort(a), np.sort(b))
    assert not np.array_equal(a, b)
    # Runs of 2 FOVs: the FOV changes window at most 4 times (5 windows of 2 FOVs each).
    window_of = {}
    for f in fovs[b]:
      window_of.setdefault(f, len(window_of) // 2)
    windows = np.array([window_of[f] for f in fovs[b]])
    assert np.all(np.diff(windows) >= 0) and windows.max() == 4
  # Deterministic and random-access after pickling, like the plain sampler.
  clone = pickle.loads(pickle.dumps(local))
  assert [clone[i] for i in range(2999, 1999, -1)] == [local[i] for i in range(2999, 1999, -1)]
  with pytest.raises(ValueError, match="fovs"):
    EpochSampler(np.arange(10), 10, seed=0, fov_window=2)


def test_groups_resampled_to_the_median_every_epoch():
  # Three treatments of 2, 5 and 40 cells: each epoch draws 5 of each, afresh.
  groups = np.repeat([0, 1, 2], [2, 5, 40])
  indices = np.arange(100, 100 + len(groups))
  per = median_group_size(groups)
  assert per == 5
  sampler = EpochSampler(indices, 4 * 15, seed=3, groups=groups, per_group=per)
  assert sampler.epoch_size == 15
  group_of = dict(zip(indices.tolist(), groups.tolist()))
  epochs = [[sampler[e * 15 + j] for j in range(15)] for e in range(4)]
  for drawn in epochs:
    assert np.bincount([group_of[i] for i in drawn], minlength=3).tolist() == [5, 5, 5]
    big = [i for i in drawn if group_of[i] == 2]
    assert len(set(big)) == 5  # without replacement from a group that has enough
  assert sorted(epochs[0]) != sorted(epochs[1])  # resampled, not a fixed subset
  with pytest.raises(ValueError, match="weights"):
    EpochSampler(indices, 10, 0, weights=np.ones(len(indices)), groups=groups, per_group=per)
