"""The centre cell alone: markers zero beyond its mask (+ margin), masks unchanged."""

import numpy as np
import pytest

from cellrep.data import isolate as isolate_lib


def _crops():
  rng = np.random.default_rng(0)
  crops = rng.uniform(1, 2, (2, 3 + 2, 9, 9)).astype(np.float32)  # 3 markers, 2 masks
  cell = np.zeros((2, 9, 9), np.float32)
  cell[0, 4, 4] = 1          # one pixel
  cell[1, 2:4, 5:8] = 1      # a 2x3 block
  crops[:, 4] = cell
  crops[:, 3] = (rng.uniform(size=(2, 9, 9)) > 0.5)
  return crops, cell


def test_margin_zero_keeps_the_mask_only():
  crops, cell = _crops()
  out = np.asarray(isolate_lib.isolate(crops, 0))
  np.testing.assert_array_equal(out[:, :3], crops[:, :3] * cell[:, None])
  np.testing.assert_array_equal(out[:, 3:], crops[:, 3:])


def test_margin_dilates_by_a_square():
  crops, _ = _crops()
  out = np.asarray(isolate_lib.isolate(crops, 1))
  keep = np.zeros((2, 9, 9), bool)
  keep[0, 3:6, 3:6] = True
  keep[1, 1:5, 4:9] = True
  np.testing.assert_array_equal(out[:, :3], np.where(keep[:, None], crops[:, :3], 0))
  np.testing.assert_array_equal(out[:, 3:], crops[:, 3:])


def test_off_is_identity_and_negative_margins_refused():
  crops, _ = _crops()
  assert isolate_lib.isolate(crops, isolate_lib.OFF) is crops
  with pytest.raises(ValueError, match="margin -2"):
    isolate_lib.isolate(crops, -2)
