import logging

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier

from cellrep.errors import BadValue
from cellrep.eval import probes


def _at(degrees, norms=None):
  """2-D vectors at the given angles; cosine similarity falls with the angle between them."""
  r = np.radians(np.asarray(degrees, np.float64))
  v = np.stack([np.cos(r), np.sin(r)], axis=1)
  return v if norms is None else v * np.asarray(norms, np.float64)[:, None]


def _clusters(n_per_class=40, classes=3, dim=8, spread=0.1, seed=0):
  rng = np.random.default_rng(seed)
  centres = 10.0 * np.eye(dim)[:classes] + 1.0
  x = np.concatenate([c + spread * rng.standard_normal((n_per_class, dim)) for c in centres])
  return x, np.repeat([f"type{i}" for i in range(classes)], n_per_class)


def test_nsc_nscb_by_hand():
  # Angles (deg) and compound / MoA / batch; norms differ, which cosine ignores.
  x = _at([0, 5, 10, 20, 90, 100], norms=[1, 3, 0.5, 2, 7, 1])
  compound = ["A", "A", "B", "C", "D", "E"]
  moa = ["X", "X", "X", "Y", "Y", "Y"]
  batch = [1, 2, 1, 2, 1, 2]
  out = probes.nsc_nscb(x, moa, compound, batch)
  # NSC: A@0 -> B@10, A@5 -> B@10, B@10 -> A@5, C@20 -> B@10 (wrong MoA), D <-> E.
  assert out["nsc_neighbour"].tolist() == [2, 2, 1, 2, 5, 4]
  assert out["nsc"] == pytest.approx(5 / 6)
  # NSCB: A@0 in batch 1 may only look at batch 2 (C@20, E@100) -> C@20, wrong MoA.
  assert out["nscb_neighbour"].tolist() == [3, 2, 1, 2, 5, 4]
  assert out["nscb"] == pytest.approx(4 / 6)
  assert out["nsc_scored"] == out["nscb_scored"] == 6
  assert out["nsc_excluded"] == out["nscb_excluded"] == 0
  no_batch = probes.nsc_nscb(x, moa, compound)
  assert no_batch["nsc"] == out["nsc"] and "nscb" not in no_batch


def test_nsc_nscb_excludes_profiles_without_neighbour():
  # A in batch 1 has nothing of another compound in another batch; A in batch 2 has B.
  x = _at([0, 30, 10])
  out = probes.nsc_nscb(x, ["X", "X", "Y"], ["A", "A", "B"], ["b1", "b2", "b1"])
  assert out["nscb_neighbour"].tolist() == [-1, 2, 1]
  assert out["nscb_excluded"] == 1 and out["nscb_scored"] == 2
  assert out["nscb"] == 0.0
  assert out["nsc_neighbour"].tolist() == [2, 2, 0] and out["nsc_excluded"] == 0
  one = probes.nsc_nscb(x, ["X", "X", "Y"], ["A", "A", "A"])
  assert one["nsc_excluded"] == 3 and np.isnan(one["nsc"])


def test_knn_by_hand_and_vote_ties():
  train = _at([0, 10, 20, 180], norms=[1, 2, 3, 4])
  labels = np.array(["b", "a", "a", "c"])
  # k=3 at 12 deg: 10 (a), 20 (a), 0 (b) -> a; at 170 deg with k=1 -> c.
  assert probes.knn_predict(train, labels, _at([12]), k=3).tolist() == ["a"]
  assert probes.knn_predict(train, labels, _at([170]), k=1).tolist() == ["c"]
  # k=2 gives one vote each to b (0 deg) and a (10 deg): the nearer one wins, not the
  # smallest label as in sklearn.
  assert probes.knn_predict(train, labels, _at([4, 6]), k=2).tolist() == ["b", "a"]


@pytest.mark.parametrize("block_bytes", [probes._BLOCK_BYTES, 4096])
def test_knn_matches_sklearn(monkeypatch, block_bytes):
  monkeypatch.setattr(probes, "_BLOCK_BYTES", block_bytes)  # small: many query blocks
  rng = np.random.default_rng(1)
  x = rng.standard_normal((300, 10))
  train, test = x[:200], x[200:]
  for classes in (2, 4):
    y = rng.integers(0, classes, 300)
    ref = KNeighborsClassifier(n_neighbors=11, metric="cosine", weights="uniform")
    ref.fit(train, y[:200])
    ours = probes.knn_predict(train, y[:200], test, k=11)
    votes = np.stack([np.bincount(y[:200][n], minlength=classes)
                      for n in ref.kneighbors(test, return_distance=False)])
    untied = (votes == votes.max(1, keepdims=True)).sum(1) == 1
    assert untied.sum() > 60
    np.testing.assert_array_equal(ours[untied], ref.predict(test)[untied])


def test_knn_probe_folds_match_sklearn():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((150, 6)).astype(np.float32)
  y = (x[:, 0] + 0.5 * rng.standard_normal(150) > 0).astype(int)
  result = probes.knn_probe(x, y, k=5, folds=4, seed=3)
  splits = StratifiedKFold(4, shuffle=True, random_state=3).split(x, y)
  expected = [KNeighborsClassifier(5, metric="cosine").fit(x[tr], y[tr]).score(x[te], y[te])
              for tr, te in splits]
  np.testing.assert_allclose(result.per_fold.accuracy, expected)
  assert result.folds == 4 and result.per_fold.cells.sum() == 150


@pytest.mark.parametrize("probe", [probes.knn_probe, probes.linear_probe])
def test_separable_classes_score_one(probe):
  x, y = _clusters()
  result = probe(x, y)
  assert result.folds == 5 and len(result.per_fold) == 5
  s = result.summary()
  for m in probes.METRICS:
    assert s[m] == 1.0 and s[f"{m}_sd"] == 0.0
  assert (result.predictions == y).all()


@pytest.mark.parametrize("probe", [probes.knn_probe, probes.linear_probe])
def test_random_labels_near_chance(probe):
  rng = np.random.default_rng(4)
  x = rng.standard_normal((400, 16))
  y = rng.integers(0, 4, 400)
  s = probe(x, y).summary()
  assert abs(s["accuracy"] - 0.25) < 0.08 and abs(s["balanced_accuracy"] - 0.25) < 0.08
  assert abs(s["mcc"]) < 0.1 and s["macro_f1"] < 0.35


def test_small_class_reduces_folds(caplog):
  x, y = _clusters(n_per_class=10, classes=2)
  x, y = np.concatenate([x, x[:3] + 50.0]), np.concatenate([y, ["rare"] * 3])
  with caplog.at_level(logging.WARNING, logger="cellrep.eval.probes"):
    result = probes.linear_probe(x, y, folds=5)
  assert result.folds == 3 and len(result.per_fold) == 3
  assert "3 folds instead of 5" in caplog.text


@pytest.mark.parametrize("call, field, words", [
    (lambda x, y: probes.knn_probe(x, y[:-1]), "labels", "39 values for 40 rows"),
    (lambda x, y: probes.knn_probe(x, np.full(40, "a")), "labels", "a single class"),
    (lambda x, y: probes.linear_probe(x, np.append(y[:-1], "odd")), "labels", "'odd' has 1 member"),
    (lambda x, y: probes.knn_probe(x, y, k=40), "k", "40 neighbours from 32"),
    (lambda x, y: probes.knn_probe(x, y, folds=1), "folds", "1"),
    (lambda x, y: probes.knn_probe(np.zeros((40, 3)), y), "embeddings", "row 0 is all zeros"),
    (lambda x, y: probes.linear_probe(np.r_[x[:-1], [[np.nan] * 8]], y), "embeddings", "NaN"),
    (lambda x, y: probes.linear_probe(x, y, C=0), "C", "0"),
    (lambda x, y: probes.nsc_nscb(x, y, y[:-1]), "compound", "39 values for 40 rows"),
    (lambda x, y: probes.nsc_nscb(x, [None] + list(y[1:]), y), "moa", "1 missing values"),
])
def test_bad_inputs_raise_one_clear_error(call, field, words):
  x, y = _clusters(n_per_class=20, classes=2)
  with pytest.raises(BadValue) as err:
    call(x, y)
  assert err.value.field == field and words in str(err.value)
  assert str(err.value).startswith(f"{field}: ") and "\n" not in str(err.value)
