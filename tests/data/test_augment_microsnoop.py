"""Microsnoop's pretraining augmentation: windows of the crop, the 8 symmetries of the square."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cellrep.data import augment_microsnoop as aug
from cellrep.errors import BadValue


def _symmetries(x):
  out = []
  for flipped in (x, x[:, ::-1]):
    out += [np.rot90(flipped, k) for k in range(4)]
  return out


def test_each_output_is_a_symmetry_of_a_window_of_its_crop():
  rng = np.random.default_rng(0)
  crops = rng.normal(size=(64, 1, 10, 10)).astype(np.float32)
  out = np.asarray(aug.augment(jax.random.key(1), jnp.asarray(crops), 6))
  assert out.shape == (64, 6, 6, 1)
  seen, offsets = set(), set()
  for crop, o in zip(crops[:, 0], out[..., 0]):
    match = [(dy, dx, s) for dy in range(5) for dx in range(5)
             for s, sym in enumerate(_symmetries(crop[dy:dy + 6, dx:dx + 6]))
             if np.array_equal(sym, o)]
    assert match, "not a symmetry of any window"
    seen.add(match[0][2])
    offsets.add(match[0][:2])
  assert len(seen) == 8 and len(offsets) > 10


def test_switched_off_it_is_the_centre_window():
  crops = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 1, 8, 8)
  cfg = aug.PretrainAugmentConfig(flips=False, rot90=False, shift=False)
  out = np.asarray(aug.augment(jax.random.key(0), jnp.asarray(crops), 4, cfg))
  np.testing.assert_array_equal(out[..., 0], crops[:, 0, 2:6, 2:6])
  with pytest.raises(BadValue, match="flips"):
    aug.PretrainAugmentConfig(flips="yes")
