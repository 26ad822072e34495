"""Normalisation: exact values on hand-made inputs, percentiles against numpy, masks untouched."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from cellrep.data import normalize
from cellrep.data.store import StoreWriter
from cellrep.errors import BadValue


def test_methods_on_markers_only():
  rng = np.random.default_rng(0)
  images = np.concatenate([rng.poisson(5.0, (2, 4, 4, 3)), rng.integers(0, 2, (2, 4, 4, 2))],
                          axis=-1).astype(np.float32)
  assert normalize.normalize(images, "none") is images
  ans = np.asarray(normalize.normalize(jnp.asarray(images), "anscombe"))
  np.testing.assert_allclose(ans[..., :3], 2 * np.sqrt(images[..., :3] + 0.375), rtol=1e-6)
  p99 = np.asarray(normalize.normalize(jnp.asarray(images), "p99", np.array([2.0, 4.0, 8.0])))
  np.testing.assert_allclose(p99[..., :3], images[..., :3] / [2.0, 4.0, 8.0], rtol=1e-6)
  for out in (ans, p99):
    np.testing.assert_array_equal(out[..., 3:], images[..., 3:])
  with pytest.raises(BadValue, match="normalize"):
    normalize.normalize(images, "zscore")
  with pytest.raises(ValueError, match="scales"):
    normalize.normalize(images, "p99")


def test_normalize99_per_image_and_channel_as_cellpose():
  rng = np.random.default_rng(3)
  images = np.concatenate([rng.gamma(2.0, 3.0, (2, 8, 8, 2)), np.ones((2, 8, 8, 1)),
                           rng.integers(0, 2, (2, 8, 8, 2))], axis=-1).astype(np.float32)
  out = np.asarray(normalize.normalize(jnp.asarray(images), "normalize99"))
  markers = images[..., :2]
  lo = np.percentile(markers, 1, axis=(1, 2), keepdims=True)
  hi = np.percentile(markers, 99, axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(out[..., :2], (markers - lo) / (hi - lo), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out[..., 2], 0.0)  # a constant channel: zeros, not NaN
  np.testing.assert_array_equal(out[..., 3:], images[..., 3:])


def test_channel_percentiles_over_cell_pixels(tmp_path):
  rng = np.random.default_rng(1)
  fovs = []
  for _ in range(2):
    mask = np.zeros((20, 20), np.int32)
    mask[2:10, 2:10], mask[12:18, 5:15] = 1, 2
    image = rng.integers(0, 1000, (3, 20, 20)).astype(np.uint16)
    image[2] = 0                         # an empty channel: scale 1
    image[1] = np.where(mask == 2, 7, 0)  # sparse: percentile 7
    fovs.append((image, mask))
  with StoreWriter(tmp_path / "s", ["a", "b", "c"], ["f0", "f1"], [(20, 20)] * 2, "uint16") as w:
    for i, (image, mask) in enumerate(fovs):
      w.write_fov(i, image, mask)
    store = w.commit()
  scales = normalize.channel_percentiles(store)
  inside = np.concatenate([image[:, mask > 0] for image, mask in fovs], axis=1).astype(float)
  np.testing.assert_allclose(scales[0], np.percentile(inside[0], 99), rtol=1e-6)
  assert scales[1] == 7 and scales[2] == 1
  assert normalize.store_scales(store, "none") is None
  np.testing.assert_array_equal(normalize.store_scales(store, "p99"), scales)
