"""Intensity normalisation of the marker channels, on device, after augmentation.

The methods CellSighter's paper compared:

  none      raw counts, CellSighter's default;
  p99       each marker divided by its 99th percentile over the pixels inside cells of
            the store (a per-dataset scale, so a brighter instrument or a longer
            acquisition reads the same);
  anscombe  2 sqrt(x + 3/8), the variance-stabilising transform of Poisson counts.

And the Cell Painting CNN's (DeepProfiler's) per-crop renormalisation:

  standardize  each channel of each crop to zero mean and unit standard deviation over
               the crop's pixels (a constant channel becomes zeros).

And Cellpose's / Microsnoop's per-image scaling:

  normalize99  each channel of each crop mapped by (x - p1) / (p99 - p1), its own 1st and
               99th percentiles over the crop's pixels (numpy's linear interpolation), as
               Cellpose's ``normalize99`` (a channel with p99 == p1 becomes zeros).

Normalisation runs after `cellrep.data.augment.augment`: its Poisson resampling
draws counts around the (blurred) pixel values, which only means something for
raw counts, so the counts are resampled first and normalised second. The two
mask channels (the last two of a network input, when the network sees masks) are never
touched.

`p99` scales are computed on the host from the store being read (all FOVs, no
labels involved), so a model applied to another store scales that store by its
own percentiles.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from cellrep.data.crops import NUM_MASK_CHANNELS
from cellrep.data.store import Store
from cellrep.errors import BadValue

METHODS = ("none", "p99", "anscombe", "standardize", "normalize99")


def check_method(method: str) -> None:
  if method not in METHODS:
    raise BadValue("normalize", f"{method!r} is not a known method", f"one of {list(METHODS)}")


def channel_percentiles(store: Store, q: float = 99.0, max_pixels: int = 2_000_000,
                        seed: int = 0) -> np.ndarray:
  """Per-channel q-th percentile of the pixels inside cells, over every FOV of `store`.

  At most `max_pixels` cell pixels are used (a seeded subsample spread evenly
  over the FOVs), so a large store costs one read of each FOV and little memory.

  Returns:
    [K] float32 in the store's pixel units. A channel whose percentile is 0 (a
    sparse marker) gets its maximum instead, and 1 if that is 0 too, so that
    dividing by it never blows up.
  """
  rng = np.random.default_rng(seed)
  per_fov = max(1, max_pixels // len(store.meta.fovs))
  samples = []
  for fov in range(len(store.meta.fovs)):
    image, mask = store.read_fov(fov)
    pixels = image[:, mask > 0]  # [K, cell pixels]
    if pixels.shape[1] > per_fov:
      pixels = pixels[:, rng.choice(pixels.shape[1], per_fov, replace=False)]
    samples.append(pixels.astype(np.float32))
  pixels = np.concatenate(samples, axis=1)
  if pixels.shape[1] == 0:
    return np.ones(len(store.meta.channels), np.float32)
  value = np.percentile(pixels, q, axis=1)
  value = np.where(value > 0, value, pixels.max(axis=1))
  return np.where(value > 0, value, 1.0).astype(np.float32)


def store_scales(store: Store, method: str) -> np.ndarray | None:
  """The per-channel divisors `method` needs for `store` ([K] float32), or None."""
  check_method(method)
  return channel_percentiles(store) if method == "p99" else None


def standardize(x: jnp.ndarray, eps: float = 1e-6, axes: tuple[int, int] = (1, 2)) -> jnp.ndarray:
  """Each channel of each image to mean 0 and std 1 over its pixels (`axes`: H, W of NHWC).

  Returns float32 (x - mean) / max(std, eps) with the population std; a constant channel
  (max == min) gives exact zeros, whatever the rounding of its mean.
  """
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=axes, keepdims=True)
  dev = x - mean
  std = jnp.sqrt(jnp.mean(dev * dev, axis=axes, keepdims=True))
  flat = jnp.max(x, axis=axes, keepdims=True) == jnp.min(x, axis=axes, keepdims=True)
  return jnp.where(flat, 0.0, dev / jnp.maximum(std, eps))


def normalize99(x: jnp.ndarray, axes: tuple[int, int] = (1, 2)) -> jnp.ndarray:
  """Each channel of each image to (x - p1) / (p99 - p1), its 1st and 99th percentiles over
  its pixels (`axes`: H, W of NHWC); float32, and zeros where p99 == p1."""
  x = x.astype(jnp.float32)
  lo, hi = jnp.percentile(x, jnp.array([1.0, 99.0]), axis=axes, keepdims=True)
  span = hi - lo
  return jnp.where(span > 0, (x - lo) / jnp.where(span > 0, span, 1.0), 0.0)


def normalize(images: jnp.ndarray, method: str, scales=None,
              masks: int = NUM_MASK_CHANNELS) -> jnp.ndarray:
  """Normalises the marker channels of network inputs.

  Args:
    images: [B, H, W, K + masks] float32 NHWC, markers then `masks` mask channels.
    method: one of METHODS (static).
    scales: [K] divisors for "p99" (see `store_scales`).

  Returns:
    images with channels 0..K-1 normalised; the masks unchanged.
  """
  if method == "none":
    return images
  k = images.shape[-1] - masks
  markers, masks = images[..., :k], images[..., k:]
  if method == "p99":
    if scales is None:
      raise ValueError("p99 normalisation needs per-channel scales")
    markers = markers / jnp.asarray(scales, jnp.float32)
  elif method == "anscombe":
    markers = 2.0 * jnp.sqrt(jnp.maximum(markers, 0.0) + 0.375)
  elif method == "standardize":
    markers = standardize(markers)
  elif method == "normalize99":
    markers = normalize99(markers)
  else:
    check_method(method)
  return jnp.concatenate([markers, masks], axis=-1)
