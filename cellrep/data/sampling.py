"""Which cells train and evaluate, and in what order: FOV splits, class caps, balanced epochs.

CellSighter (train.py) balances classes with a `WeightedRandomSampler` whose
weight per cell is total / count(category), with categories either the classes
or coarse lineages from `hierarchy_match`; an epoch draws len(train) cells with
replacement. `EpochSampler` does the same, deterministically from (seed, epoch),
as a random-access sequence of cell indices that Grain can read from any
position (so a resumed run sees the same cells).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from cellrep.errors import BadValue

BALANCE = ("none", "class", "hierarchy")


def split_fovs(fovs: Sequence[str], val_fovs: Sequence[str] = (), val_fraction: float = 0.2,
               seed: int = 0, train_fovs: Sequence[str] = ()) -> tuple[list[str], list[str]]:
  """(train, validation) FOV names. Explicit `val_fovs` win; else a seeded fraction (≥ 1 FOV).

  With a single FOV there is nothing to hold out: both lists hold it. Explicit
  `train_fovs` (CellSighter's `train_set`) may overlap `val_fovs` (its example trains
  and validates on the same image); without `val_fovs` the other FOVs are held out,
  or, when there are none, the training FOVs themselves.
  """
  fovs = list(fovs)
  for key, chosen in (("train_fovs", train_fovs), ("val_fovs", val_fovs)):
    unknown = sorted(set(chosen) - set(fovs))
    if unknown:
      raise BadValue(key, f"unknown FOVs {unknown}", f"names among {fovs[:20]}")
  if train_fovs:
    train = [f for f in fovs if f in set(train_fovs)]
    return train, [f for f in fovs if f in set(val_fovs)] or [f for f in fovs if f not in train] or train
  if val_fovs:
    val = [f for f in fovs if f in set(val_fovs)]
  elif len(fovs) == 1:
    return fovs, fovs
  else:
    n_val = min(len(fovs) - 1, max(1, int(round(val_fraction * len(fovs)))))
    order = np.random.default_rng(seed).permutation(len(fovs))
    val = [fovs[i] for i in sorted(order[:n_val])]
  train = [f for f in fovs if f not in set(val)]
  if not train:
    raise BadValue("val_fovs", "every FOV is held out", "at least one training FOV")
  return train, val


def parse_hierarchy(text: str, classes: Sequence[str]) -> dict[int, str] | None:
  """"CD4 T=T cell;CD8 T=T cell;..." -> {class index: category}; every class must be mapped."""
  if not text:
    return None
  mapping = {}
  for part in filter(None, (p.strip() for p in text.split(";"))):
    name, eq, category = part.partition("=")
    if not eq:
      raise BadValue("hierarchy", f"{part!r} has no '='", "'class=category;...'")
    mapping[name.strip()] = category.strip()
  missing = [c for c in classes if c not in mapping]
  if missing:
    raise BadValue("hierarchy", f"classes without a category: {missing}", "every class mapped")
  return {i: mapping[c] for i, c in enumerate(classes)}


def cap_per_class(indices: np.ndarray, labels: np.ndarray, max_per_class: int,
                  seed: int = 0) -> np.ndarray:
  """At most `max_per_class` cells of each class (CellSighter's `size_data`); 0 = no cap."""
  if max_per_class <= 0:
    return indices
  rng = np.random.default_rng(seed)
  kept = []
  for c in np.unique(labels[indices]):
    members = indices[labels[indices] == c]
    if len(members) > max_per_class:
      members = rng.choice(members, max_per_class, replace=False)
    kept.append(members)
  return np.sort(np.concatenate(kept))


def sample_weights(labels: np.ndarray, balance: str = "class",
                   categories: Mapping[int, str] | None = None) -> np.ndarray:
  """Per-cell sampling weight: total / count(category), CellSighter's rule.

  labels: [N] class index per cell (all ≥ 0). balance "none" → uniform; "class" →
  each class equally often; "hierarchy" → each category of `categories`
  (class index → coarse category) equally often.
  """
  if balance == "none":
    return np.ones(len(labels))
  if balance == "hierarchy":
    if not categories:
      raise BadValue("hierarchy", "balance='hierarchy' needs a class → category map",
                        "a mapping of every class name to a category")
    keys = np.array([categories[int(c)] for c in labels])
  elif balance == "class":
    keys = labels
  else:
    raise BadValue("balance", f"{balance!r} is not a known choice", f"one of {list(BALANCE)}")
  _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
  return len(labels) / counts[inverse]


def median_group_size(groups) -> int:
  """The median number of items per group (rounded, at least 1)."""
  _, counts = np.unique(np.asarray(groups), return_counts=True)
  return max(1, int(round(float(np.median(counts))))) if len(counts) else 1


class EpochSampler:
  """A random-access sequence of cell indices: `num_samples` draws in epochs of len(indices)
  (of per_group x groups when groups are resampled).

  Epoch e is drawn from `np.random.default_rng((seed, e))`: with replacement and
  probability ∝ weights when weights are given, else a permutation. Item i only
  depends on (seed, i), so any position can be read, by any worker, in any order.

  Resampled groups (`groups`, a group id per index, and `per_group` > 0: the Cell
  Painting CNN's treatment balancing): every epoch draws `per_group` cells of each
  group afresh — without replacement from a group that has that many, with
  replacement from a smaller one — and shuffles them together; an epoch is then
  per_group x groups draws (`median_group_size` gives DeepProfiler's choice, the
  median group size).

  FOV-local order (`fov_window` > 0, `fovs` the FOV of each of `indices`): the
  epoch's draws, the same cells as without it, are reordered so that the cells of
  `fov_window` FOVs at a time (FOVs in a random order) are shuffled together.
  Consecutive batches then read the same few FOVs, which the crop reader keeps
  decoded in memory (`CropSource`): each FOV is decoded about once per epoch
  instead of the chunks under every crop once per crop, when the FOVs do not all
  fit in memory. Batches mix fewer FOVs; class balance is unchanged.
  """

  def __init__(self, indices: np.ndarray, num_samples: int, seed: int,
               weights: np.ndarray | None = None, fovs: np.ndarray | None = None,
               fov_window: int = 0, groups: np.ndarray | None = None, per_group: int = 0):
    self.indices = np.asarray(indices, np.int64)
    if len(self.indices) == 0:
      raise ValueError("no cells to sample from")
    self.num_samples = int(num_samples)
    self.seed = int(seed)
    self.p = None if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
    self.fov_window = int(fov_window)
    if self.fov_window < 0:
      raise ValueError(f"fov_window must be >= 0, got {fov_window}")
    if self.fov_window and (fovs is None or len(fovs) != len(self.indices)):
      raise ValueError("fov_window needs the FOV of every index (fovs, as long as indices)")
    self.fovs = None if fovs is None else np.asarray(fovs, np.int64)
    self.per_group = int(per_group)
    if self.per_group:
      if groups is None or len(groups) != len(self.indices):
        raise ValueError("per_group needs the group of every index (groups, as long as indices)")
      if weights is not None:
        raise ValueError("per_group and weights are two ways to balance: give one")
      _, inverse, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
      self._members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
      self.epoch_size = self.per_group * len(self._members)
    else:
      self.epoch_size = len(self.indices)
    # (epoch, order) swapped as one reference: Grain reads from several threads.
    self._cache = (-1, None)

  def __len__(self) -> int:
    return self.num_samples

  def __repr__(self) -> str:
    return (f"EpochSampler(cells={len(self.indices)}, num_samples={self.num_samples}, "
            f"seed={self.seed}, weighted={self.p is not None}, fov_window={self.fov_window}, "
            f"per_group={self.per_group})")

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_cache"] = (-1, None)
    return state

  def epoch(self, e: int) -> np.ndarray:
    rng = np.random.default_rng((self.seed, e))
    n = len(self.indices)
    if self.per_group:
      k = self.per_group
      drawn = np.concatenate([rng.choice(m, size=k, replace=len(m) < k) for m in self._members])
      drawn = drawn[rng.permutation(len(drawn))]
    elif self.p is None:
      drawn = rng.permutation(n)
    else:
      drawn = rng.choice(n, size=n, replace=True, p=self.p)
    if self.fov_window:
      drawn = self._fov_local(drawn, rng)
    return self.indices[drawn]

  def _fov_local(self, drawn: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """drawn (positions into indices) reordered: windows of fov_window FOVs, shuffled within."""
    fov = self.fovs[drawn]
    order = rng.permutation(np.unique(fov))
    window = np.empty(fov.max() + 1, np.int64)
    window[order] = np.arange(len(order)) // self.fov_window
    # Sort by (window, random key): a shuffle inside each window, windows in FOV order.
    return drawn[np.lexsort((rng.random(len(drawn)), window[fov]))]

  def __getitem__(self, i: int) -> int:
    if not 0 <= i < self.num_samples:
      raise IndexError(i)
    e, j = divmod(int(i), self.epoch_size)
    cached_epoch, order = self._cache
    if cached_epoch != e:
      order = self.epoch(e)
      self._cache = (e, order)
    return int(order[j])
