"""Tests of cellrep.data.augment_cellpainting: DeepProfiler's augmentations, jitted, per sample."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cellrep.data import augment_cellpainting as cp, normalize
from cellrep.data.augment import center_start
from cellrep.errors import BadValue

# Every augmentation off; tests switch on the one they look at.
OFF = cp.CellPaintingAugmentConfig(crop_p=0.0, flips=False, rot90=False, brightness=0.0,
                                   contrast=0.0)
SYMMETRIES = dataclasses.replace(OFF, flips=True, rot90=True)


def _crops(batch=4, channels=5, size=20, seed=0):
  """[B, C, S, S] 8-bit values as floats, as stored."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, 256, (batch, channels, size, size)).astype(np.float32))


def _distinct(batch=1, channels=2, size=16):
  """[B, C, S, S], each channel a shuffle of 0 .. S * S - 1."""
  rng = np.random.default_rng(1)
  x = np.stack([np.stack([rng.permutation(size * size).reshape(size, size)
                          for _ in range(channels)]) for _ in range(batch)])
  return jnp.asarray(x.astype(np.float32))


def _standardized(x):
  """NumPy reference: [B, H, W, C] to mean 0, population std 1 per image and channel."""
  x = np.asarray(x, np.float64)
  return (x - x.mean(axis=(1, 2), keepdims=True)) / x.std(axis=(1, 2), keepdims=True)


def _dihedral(image):
  """The 8 symmetries of a square [n, n, C] image."""
  turns = [np.rot90(image, k, axes=(0, 1)) for k in range(4)]
  return turns + [t[:, ::-1] for t in turns]


def test_center_is_the_standardised_centre_region_in_nhwc():
  crops = _crops(size=20)
  out = cp.center(crops, 12)
  assert out.shape == (4, 12, 12, 5) and out.dtype == jnp.float32
  region = np.transpose(np.asarray(crops)[:, :, 4:16, 4:16], (0, 2, 3, 1))
  np.testing.assert_allclose(out, _standardized(region), rtol=0, atol=2e-6)


def test_augment_shape_and_dtype():
  for size, n in ((20, 20), (20, 12)):
    out = cp.augment(jax.random.key(0), _crops(size=size), n)
    assert out.shape == (4, n, n, 5) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("n", [20, 13])
def test_everything_off_is_center_exactly(n):
  crops = jnp.asarray(np.random.default_rng(2).uniform(0, 255, (4, 5, 20, 20)).astype(np.float32))
  assert not OFF.active
  np.testing.assert_array_equal(cp.augment(jax.random.key(1), crops, n, OFF), cp.center(crops, n))
  # A crop of the full side is no crop: the resampling copies the centre region bit for bit.
  full = dataclasses.replace(OFF, crop_p=1.0, crop_min=1.0, crop_max=1.0)
  u = jax.random.uniform(jax.random.key(1), (4, 7))
  a, t = cp.source_map(u, n, full)
  start = center_start(20, n)
  region = np.transpose(np.asarray(crops)[:, :, start:start + n, start:start + n], (0, 2, 3, 1))
  np.testing.assert_array_equal(cp.resample(crops, n, a, t), region)
  np.testing.assert_allclose(cp.augment(jax.random.key(1), crops, n, full), cp.center(crops, n),
                             rtol=0, atol=1e-6)


def test_resampled_symmetries_copy_pixels_exactly():
  batch = 32
  crops = np.random.default_rng(3).uniform(0, 255, (batch, 3, 16, 16)).astype(np.float32)
  a, t = cp.source_map(jax.random.uniform(jax.random.key(2), (batch, 7)), 16, SYMMETRIES)
  out = np.asarray(cp.resample(jnp.asarray(crops), 16, a, t))
  for b in range(batch):
    assert any(np.array_equal(out[b], c) for c in _dihedral(np.transpose(crops[b], (1, 2, 0))))


@pytest.mark.parametrize("cfg,allowed", [
    (SYMMETRIES, range(8)),
    (dataclasses.replace(OFF, rot90=True), [0, 1, 2, 3]),
    # Left-right, up-down (a left-right flip and a half turn) and both (a half turn).
    (dataclasses.replace(OFF, flips=True), [0, 4, 6, 2]),
])
def test_flips_and_quarter_turns_are_exact_permutations(cfg, allowed):
  batch = 64
  crops = jnp.broadcast_to(_distinct(), (batch, 2, 16, 16))
  out = np.asarray(cp.augment(jax.random.key(2), crops, 16, cfg))
  ref = np.asarray(cp.center(crops[:1], 16))[0]
  candidates = _dihedral(ref)
  seen = set()
  for b in range(batch):
    # Standardised values are the centre's, moved. A shuffle of 0..255 has mean 127.5 and
    # squared deviations in quarters: its statistics are exact whatever the sum's order.
    np.testing.assert_array_equal(np.sort(out[b], axis=None), np.sort(ref, axis=None))
    match = [k for k, c in enumerate(candidates) if np.array_equal(out[b], c)]
    assert len(match) == 1, f"sample {b} is not a symmetry of the centre crop"
    seen.add(match[0])
  # Each sample draws its own: every allowed symmetry turns up, no other.
  assert seen == set(allowed)


def test_samples_of_one_batch_get_their_own_transforms():
  crops = jnp.broadcast_to(_crops(batch=1), (8, 5, 20, 20))
  out = np.asarray(cp.augment(jax.random.key(3), crops, 20))
  for i in range(8):
    for j in range(i):
      assert not np.array_equal(out[i], out[j])
  # Brightness and contrast are drawn per channel too.
  jitter = np.asarray(cp.augment(jax.random.key(3), crops, 20,
                                 dataclasses.replace(OFF, brightness=0.1, contrast=0.2)))
  means = jitter.mean(axis=(1, 2))
  assert len(np.unique(np.round(means, 5))) == means.size


def test_same_key_same_output_different_key_different():
  crops = _crops()
  a = cp.augment(jax.random.key(4), crops, 20)
  np.testing.assert_array_equal(a, cp.augment(jax.random.key(4), crops, 20))
  assert not np.array_equal(a, cp.augment(jax.random.key(5), crops, 20))
  # Under vmap over keys each view is the one its key gives alone.
  keys = jax.random.split(jax.random.key(6), 3)
  views = jax.jit(jax.vmap(lambda k: cp.augment(k, crops, 20)))(keys)
  assert views.shape == (3, 4, 20, 20, 5)
  for i in range(3):
    np.testing.assert_allclose(views[i], cp.augment(keys[i], crops, 20), rtol=0, atol=1e-5)


def test_standardize_gives_zero_mean_unit_std_and_zeros_for_a_constant_channel():
  rng = np.random.default_rng(7)
  # Channel means up to 10 stds from 0, as in 8-bit crops: float32 keeps the mean to ~1e-6 std.
  x = rng.normal(0.0, 1.0, (3, 16, 16, 4)) * [40.0, 5.0, 0.1, 300.0] + [128.0, 20.0, 0.5, 3000.0]
  x[1, :, :, 2] = 200.3  # constant: its float32 mean need not round to 200.3
  x[2, :, :, 0] = 0.0
  z = np.asarray(normalize.standardize(jnp.asarray(x, jnp.float32)))
  assert z.dtype == np.float32
  flat = np.zeros((3, 4), bool)
  flat[1, 2] = flat[2, 0] = True
  np.testing.assert_array_equal(z[1, :, :, 2], 0.0)
  np.testing.assert_array_equal(z[2, :, :, 0], 0.0)
  mean, std = z.mean(axis=(1, 2)), z.std(axis=(1, 2))
  np.testing.assert_allclose(mean[~flat], 0.0, atol=1e-5)
  np.testing.assert_allclose(std[~flat], 1.0, atol=1e-5)


def _square(batch, n=128, side=32):
  """[B, 1, n, n]: 0 with a centred square of 255."""
  x = np.zeros((batch, 1, n, n), np.float32)
  lo = (n - side) // 2
  x[:, :, lo:lo + side, lo:lo + side] = 255.0
  return jnp.asarray(x)


def _widths(out):
  """Widths of a bright square along columns and rows, in pixels, from its edge profiles.

  The square's standardised image has two levels; a bilinear resampling ramps between them.
  Summing a level-normalised profile counts the ramp's samples by their height, which gives
  the width to within a small fraction of a pixel.
  """
  x = out[..., 0]
  lo = x.min(axis=(1, 2), keepdims=True)
  hi = x.max(axis=(1, 2), keepdims=True)
  x = (x - lo) / (hi - lo)
  return x.max(axis=1).sum(axis=1), x.max(axis=2).sum(axis=1)


@pytest.mark.parametrize("crop_min,crop_max", [(0.8, 1.0), (0.8, 0.8), (0.9, 0.95)])
def test_random_crop_grows_a_square_by_the_inverse_of_a_scale_in_range(crop_min, crop_max):
  batch, side = 64, 32
  cfg = dataclasses.replace(OFF, crop_p=1.0, crop_min=crop_min, crop_max=crop_max)
  out = np.asarray(cp.augment(jax.random.key(8), _square(batch, side=side), 128, cfg))
  across, down = _widths(out)
  growth = across / side
  # Each width is within 0.15 px of side / scale (measured against the drawn scales), so
  # within 0.01 of the growth on a 32 px side.
  np.testing.assert_allclose(across, down, atol=0.3)  # one scale for both axes
  assert (growth >= 1 / crop_max - 0.01).all() and (growth <= 1 / crop_min + 0.01).all()
  if crop_max > crop_min:
    # Spread over the range, not stuck at one end.
    span = 1 / crop_min - 1 / crop_max
    assert growth.min() < 1 / crop_max + 0.2 * span and growth.max() > 1 / crop_min - 0.2 * span
  # The crop sits anywhere in the window: the square moves as well.
  columns = out[..., 0].max(axis=1)
  centre = (columns * np.arange(128)).sum(axis=1) / columns.sum(axis=1)
  assert centre.std() > 1.0


def test_crop_p_is_the_share_of_cropped_samples():
  batch = 256
  crops = _square(batch)
  out = np.asarray(cp.augment(jax.random.key(9), crops, 128, dataclasses.replace(OFF, crop_p=0.5)))
  plain = np.asarray(cp.center(crops[:1], 128))
  cropped = np.array([not np.array_equal(o, plain[0]) for o in out])
  assert 0.4 < cropped.mean() < 0.6


def test_brightness_and_contrast_stay_in_deepprofilers_ranges():
  batch, channels = 64, 5
  cfg = dataclasses.replace(OFF, brightness=0.1, contrast=0.2)
  out = np.asarray(cp.augment(jax.random.key(10), _crops(batch, channels), 20, cfg), np.float64)
  # On a standardised channel adding delta and scaling about the mean by f give mean delta, std f.
  mean, std = out.mean(axis=(1, 2)), out.std(axis=(1, 2))
  assert np.abs(mean).max() <= 0.1 + 1e-5 and np.abs(mean).max() > 0.09
  assert std.min() >= 0.8 - 1e-5 and std.max() <= 1.2 + 1e-5
  assert std.min() < 0.82 and std.max() > 1.18
  # The same pixels underneath: undoing the jitter gives the standardised centre.
  ref = np.asarray(cp.center(_crops(batch, channels), 20), np.float64)
  np.testing.assert_allclose((out - mean[:, None, None]) / std[:, None, None], ref, atol=1e-5)


def test_jit_compiles_once_for_repeated_calls():
  before = cp.augment._cache_size()
  for seed in range(3):
    cp.augment(jax.random.key(seed), _crops(batch=3, channels=2, size=10, seed=seed), 8)
  assert cp.augment._cache_size() == before + 1


def test_config_is_validated_and_hashable():
  cfg = cp.CellPaintingAugmentConfig()
  assert (cfg.crop_p, cfg.crop_min, cfg.crop_max, cfg.brightness, cfg.contrast) == (
      0.5, 0.8, 1.0, 0.1, 0.2)
  assert hash(cfg) == hash(cp.CellPaintingAugmentConfig())
  for field, value in [("crop_p", 1.5), ("crop_p", -0.1), ("crop_min", 0.0), ("crop_min", 1.2),
                       ("brightness", -0.1), ("brightness", float("nan")), ("contrast", 1.0),
                       ("contrast", -0.2), ("flips", 1), ("rot90", "yes")]:
    with pytest.raises(BadValue, match=field) as caught:
      cp.CellPaintingAugmentConfig(**{field: value})
    assert caught.value.field == field
  with pytest.raises(BadValue, match="crop_max"):
    cp.CellPaintingAugmentConfig(crop_min=0.9, crop_max=0.85)
  with pytest.raises(BadValue, match="input_size"):
    cp.augment(jax.random.key(0), _crops(size=10), 12)
  with pytest.raises(BadValue, match="crops"):
    cp.center(jnp.zeros((2, 3, 10, 12)), 8)
