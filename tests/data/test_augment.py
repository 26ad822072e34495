"""Tests of cellrep.data.augment: CellSighter's augmentations, jitted, per-member RNG."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from cellrep.data import augment as aug
from cellrep.errors import BadValue

# Every augmentation off; tests switch on the one they look at.
OFF = aug.AugmentConfig(poisson=False, dilate_p=0.0, rotate=False, shift_apply_p=0.0, flip_p=0.0)


def _crops(batch=4, markers=3, size=20, seed=0):
  """[B, K + 2, S, S]: positive markers, then all-cells and centre-cell masks (0/1)."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(1.0, 10.0, (batch, markers + 2, size, size)).astype(np.float32)
  yy, xx = np.mgrid[:size, :size]
  mid = (size - 1) / 2
  cell = ((yy - mid) ** 2 + (xx - mid) ** 2 <= (size / 6) ** 2)
  x[:, -2] = (rng.random((batch, size, size)) < 0.3) | cell
  x[:, -1] = cell
  return jnp.asarray(x)


def _nhwc(x):
  return np.transpose(np.asarray(x), (0, 2, 3, 1))


def test_center_start_is_torchvision_center_crop():
  assert aug.center_start(20, 12) == 4
  assert aug.center_start(21, 12) == 4  # round(4.5): Python rounds half to even
  assert aug.center_start(23, 12) == 6  # round(5.5)
  assert aug.center_start(20, 25) == -2  # pads (25 - 20) // 2 = 2 zeros before
  assert aug.center_start(20, 23) == -1


def test_center_is_the_plain_centre_crop_in_nhwc():
  crops = _crops(size=20)
  out = aug.center(crops, 12)
  assert out.shape == (4, 12, 12, 5) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, _nhwc(crops[:, :, 4:16, 4:16]))
  # Larger than the window: zero padding around it, as torchvision's CenterCrop.
  padded = np.asarray(aug.center(crops, 24))
  np.testing.assert_array_equal(padded[:, 2:22, 2:22], _nhwc(crops))
  assert not padded[:, :2].any() and not padded[:, 22:].any()


def test_augment_shape_dtype_and_disabled_is_center():
  crops = _crops()
  out = aug.augment(jax.random.key(0), crops, 12, aug.AugmentConfig())
  assert out.shape == (4, 12, 12, 5) and out.dtype == jnp.float32
  off = aug.augment(jax.random.key(0), crops, 12, aug.AugmentConfig(enabled=False))
  np.testing.assert_array_equal(off, aug.center(crops, 12))


def test_deterministic_per_key_and_different_across_keys():
  crops = _crops()
  cfg = aug.AugmentConfig()
  a = aug.augment(jax.random.key(1), crops, 12, cfg)
  np.testing.assert_array_equal(a, aug.augment(jax.random.key(1), crops, 12, cfg))
  assert not np.array_equal(a, aug.augment(jax.random.key(2), crops, 12, cfg))
  # Each sample draws its own parameters: copies of one crop come out different.
  same = jnp.broadcast_to(crops[:1], crops.shape)
  b = np.asarray(aug.augment(jax.random.key(1), same, 12, cfg))
  assert all(not np.array_equal(b[0], b[i]) for i in range(1, 4))


def test_vmap_over_member_keys_gives_each_member_its_own_augmentation():
  crops = _crops()
  cfg = aug.AugmentConfig()
  keys = jax.random.split(jax.random.key(3), 3)
  members = jax.jit(jax.vmap(lambda k: aug.augment(k, crops, 12, cfg)))(keys)
  assert members.shape == (3, 4, 12, 12, 5)
  for i in range(3):
    np.testing.assert_array_equal(members[i], aug.augment(keys[i], crops, 12, cfg))
    for j in range(i):
      assert not np.array_equal(members[i], members[j])


def test_masks_stay_binary_after_every_augmentation():
  out = np.asarray(aug.augment(jax.random.key(4), _crops(batch=8), 12, aug.AugmentConfig()))
  assert set(np.unique(out[..., -2:])) <= {0.0, 1.0}
  assert out[..., -1].any()


@pytest.mark.parametrize("footprint,ksize,rows,cols", [
    # Measured with opencv-python-headless 4.11: cv2.dilate(img, np.ones(k, np.uint8)) on a
    # single pixel at (4, 4). OpenCV 4 reads the 1-D kernel as a k x 1 column, anchor k // 2.
    ("column", 2, [4, 5], [4]),
    ("column", 3, [3, 4, 5], [4]),
    ("column", 5, [2, 3, 4, 5, 6], [4]),
    ("square", 2, [4, 5], [4, 5]),
    ("square", 3, [3, 4, 5], [3, 4, 5]),
])
def test_dilate_matches_opencv(footprint, ksize, rows, cols):
  x = np.zeros((1, 9, 9), np.float32)
  x[0, 4, 4] = 1
  out = np.asarray(aug.dilate(jnp.asarray(x), ksize, footprint))[0]
  expected = np.zeros((9, 9), np.float32)
  expected[np.ix_(rows, cols)] = 1
  np.testing.assert_array_equal(out, expected)


def test_dilation_only_grows_masks_and_leaves_markers():
  crops = _crops(batch=8, size=16)
  cfg = dataclasses.replace(OFF, dilate_p=1.0)
  out = np.asarray(aug.augment(jax.random.key(5), crops, 16, cfg))
  before = _nhwc(crops)
  np.testing.assert_array_equal(out[..., :-2], before[..., :-2])
  assert np.all(out[..., -2:] >= before[..., -2:])
  # Every mask is dilated (p = 1) by a kernel of at least 2: each one grows.
  grown = (out[..., -2:] > before[..., -2:]).any(axis=(1, 2))
  assert grown.all()


def test_forced_flips_give_the_flipped_centre_crop():
  crops = _crops()
  out = aug.augment(jax.random.key(6), crops, 12, dataclasses.replace(OFF, flip_p=1.0))
  np.testing.assert_array_equal(out, np.asarray(aug.center(crops, 12))[:, ::-1, ::-1])


def test_warp_rotation_is_counter_clockwise_like_torchvision():
  crops = _crops(batch=1, size=20)
  starts = jnp.zeros((1, 5, 2), jnp.int32)
  no = jnp.zeros((1,), bool)
  out = jax.jit(aug.warp, static_argnums=1)(crops, 20, jnp.array([90.0]), starts, no, no)
  np.testing.assert_array_equal(out, _nhwc(np.rot90(np.asarray(crops), 1, axes=(2, 3))))


@pytest.mark.parametrize("size", [20, 21])
def test_rotation_leaves_a_centred_disc_unchanged(size):
  batch, radius = 8, 6.0
  yy, xx = np.mgrid[:size, :size]
  dist = np.hypot(yy - (size - 1) / 2, xx - (size - 1) / 2)
  disc = (dist <= radius).astype(np.float32)
  crops = jnp.asarray(np.broadcast_to(disc, (batch, 3, size, size)))
  cfg = dataclasses.replace(OFF, rotate=True)
  out = np.asarray(aug.augment(jax.random.key(7), crops, size, cfg))
  # A rotated pixel keeps its distance to the centre and nearest-neighbour rounding moves
  # it by at most sqrt(2) / 2 px, so pixels more than 1 px from the rim cannot change.
  far = np.abs(dist - radius) > 1.0
  np.testing.assert_array_equal(out[:, far], _nhwc(crops)[:, far])
  assert (out != _nhwc(crops)).any()  # the rim did move: the rotation ran


def _shift_of(out, src, max_shift):
  """The (dy, dx) with out[y, x] == src[y + dy, x + dx] (zero outside src), or None."""
  n = out.shape[0]
  found = []
  for dy in range(-max_shift, max_shift + 1):
    for dx in range(-max_shift, max_shift + 1):
      ref = np.zeros_like(out)
      ys, xs = slice(max(0, -dy), min(n, n - dy)), slice(max(0, -dx), min(n, n - dx))
      ref[ys, xs] = src[ys.start + dy:ys.stop + dy, xs.start + dx:xs.stop + dx]
      if np.array_equal(out, ref):
        found.append((dy, dx))
  return found[0] if len(found) == 1 else None


def test_per_channel_shift_moves_each_channel_by_an_integer_offset_with_zeros_behind():
  size, shift_max = 16, 5
  crops = _crops(batch=4, size=size)
  cfg = dataclasses.replace(OFF, shift_apply_p=1.0, shift_p=1.0, shift_max=shift_max)
  out = np.asarray(aug.augment(jax.random.key(8), crops, size, cfg))
  src = np.asarray(crops)
  shifts = set()
  for b in range(4):
    for c in range(5):
      d = _shift_of(out[b, :, :, c], src[b, c], shift_max)
      assert d is not None, (b, c)
      # CenterCrop(n + 5) of an n window starts 2 px outside it, RandomCrop adds 0..5.
      assert all(-2 <= v <= 3 for v in d)
      shifts.add(d)
      if d != (0, 0):
        assert (out[b, :, :, c] == 0).any()  # markers are >= 1: a zero is vacated space
  assert len(shifts) > 1  # channels move independently


def test_per_channel_shift_reads_the_window_margin_when_there_is_one():
  size, n = 26, 16
  crops = _crops(batch=4, size=size)
  cfg = dataclasses.replace(OFF, shift_apply_p=1.0, shift_p=1.0)
  out = np.asarray(aug.augment(jax.random.key(9), crops, n, cfg))
  src = np.asarray(crops)
  plain = aug.center_start(size, n)
  # CenterCrop(n + 5) starts round(2.5) = 2, three before the plain crop; RandomCrop adds 0..5.
  lo = aug.center_start(size, n + 5) - plain
  assert lo == -3
  for b in range(4):
    for c in range(3):  # markers: strictly positive, so no zeros may appear
      assert (out[b, :, :, c] > 0).all()
      matches = [(dy, dx) for dy in range(-5, 6) for dx in range(-5, 6)
                 if np.array_equal(out[b, :, :, c],
                                   src[b, c, plain + dy:plain + dy + n, plain + dx:plain + dx + n])]
      assert len(matches) == 1 and all(lo <= v <= lo + 5 for v in matches[0])


def test_gaussian_blur_matches_opencv():
  # cv2.GaussianBlur(x, (5, 5), 0) with 16 at the corner (opencv-python-headless 4.11):
  # the binomial kernel [1, 4, 6, 4, 1] / 16 and the reflect-101 border.
  x = np.zeros((7, 7), np.float32)
  x[0, 0] = 16
  out = np.asarray(aug.gaussian_blur(jnp.asarray(x)))
  np.testing.assert_allclose(out[:3, :3], [[2.25, 1.5, 0.375], [1.5, 1.0, 0.25],
                                           [0.375, 0.25, 0.0625]], rtol=0, atol=1e-6)
  assert out.sum() == pytest.approx(16 * (0.375 + 0.25 + 0.0625) ** 2, abs=1e-5)


@pytest.mark.parametrize("rate", [0.3, 2.0, 7.5, 11.9])
def test_poisson_quantile_is_exact_below_the_switch(rate):
  u = (np.arange(200_000, dtype=np.float64) + 0.5) / 200_000
  got = np.asarray(jax.jit(aug.poisson_quantile)(jnp.asarray(u, jnp.float32), jnp.float32(rate)))
  want = scipy.stats.poisson.ppf(u, rate)
  # Only a u within float32 accumulation error of a CDF step may land on the other side.
  cdf_steps = scipy.stats.poisson.cdf(np.arange(60), rate)
  off = got != want
  assert np.all(np.min(np.abs(u[off, None] - cdf_steps[None]), axis=1) < 1e-5)


@pytest.mark.parametrize("rate", [12.0, 40.0])
def test_poisson_quantile_approximation_above_the_switch(rate):
  u = (np.arange(200_000, dtype=np.float64) + 0.5) / 200_000
  got = np.asarray(jax.jit(aug.poisson_quantile)(jnp.asarray(u, jnp.float32), jnp.float32(rate)))
  ks = np.arange(int(rate + 15 * np.sqrt(rate)))
  pmf = np.bincount(got.astype(int), minlength=len(ks))[:len(ks)] / len(u)
  # Total variation to the true Poisson law: 0.0020 at rate 12, less above.
  assert 0.5 * np.abs(pmf - scipy.stats.poisson.pmf(ks, rate)).sum() < 0.003
  assert got.mean() == pytest.approx(rate, abs=1e-3)


@pytest.mark.parametrize("rate", [4.0, 30.0])
def test_poisson_resampling_mean_is_the_blurred_signal_and_masks_are_untouched(rate):
  size = 16
  crops = np.asarray(_crops(batch=64, size=size)).copy()
  crops[:, :3] = rate  # a constant blurs to itself (reflect border): the mean stays rate
  out = np.asarray(aug.augment(jax.random.key(10), jnp.asarray(crops), size,
                               dataclasses.replace(OFF, poisson=True)))
  np.testing.assert_array_equal(out[..., -2:], _nhwc(crops)[..., -2:])
  markers = out[..., :3]
  assert np.array_equal(markers, np.round(markers)) and markers.min() >= 0
  # 64 * 16 * 16 * 3 = 49152 draws: 5 standard errors of the mean.
  n = markers.size
  assert abs(markers.mean() - rate) < 5 * np.sqrt(rate / n)
  assert markers.var() == pytest.approx(rate, rel=0.05)


def test_config_is_validated_and_hashable():
  cfg = aug.AugmentConfig(dilate_kernels=[2, 3])
  assert cfg.dilate_kernels == (2, 3)
  assert hash(cfg) == hash(aug.AugmentConfig(dilate_kernels=(2, 3)))
  with pytest.raises(BadValue, match="flip_p"):
    aug.AugmentConfig(flip_p=1.5)
  with pytest.raises(BadValue, match="blur_ksize"):
    aug.AugmentConfig(blur_ksize=4)
  with pytest.raises(BadValue, match="dilate_footprint"):
    aug.AugmentConfig(dilate_footprint="disc")
