"""Illumination correction and 8-bit compression of Cell Painting images, as DeepProfiler does them.

Per plate and channel, the illumination function is the mean of the plate's images,
computed at `scale` of their size (25%), smoothed by a median filter, floored at a low
percentile of itself (so that dim corners do not blow up), resized back and divided by
its mean (a gain of 1 on average). Each image is divided by it, then stretched from its
0.05th to its 99.95th percentile onto 0..255 and stored as uint8 (DeepProfiler's
compression step, which applies the correction first).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


class MeanImage:
  """The running mean of images of one shape (float64)."""

  def __init__(self):
    self.sum, self.count = None, 0

  def add(self, image: np.ndarray) -> None:
    image = np.asarray(image, np.float64)
    if self.sum is None:
      self.sum = np.zeros_like(image)
    self.sum += image
    self.count += 1

  @property
  def mean(self) -> np.ndarray:
    return self.sum / max(self.count, 1)


def illumination_function(mean_image: np.ndarray, scale: float = 0.25, median_size: int = 25,
                          floor_percentile: float = 2.0) -> np.ndarray:
  """[H, W] float32 gains, mean 1, from the mean image of a plate's channel."""
  mean_image = np.asarray(mean_image, np.float64)
  h, w = mean_image.shape
  small = ndimage.zoom(mean_image, scale, order=1, grid_mode=True, mode="nearest") \
      if scale != 1 else mean_image
  if median_size > 1:
    small = ndimage.median_filter(small, size=min(median_size, *small.shape), mode="nearest")
  floor = np.percentile(small, floor_percentile)
  small = np.maximum(small, floor if floor > 0 else max(float(small.max()) * 1e-6, 1e-12))
  full = ndimage.zoom(small, (h / small.shape[0], w / small.shape[1]), order=1,
                      grid_mode=True, mode="nearest")[:h, :w]
  if full.shape != (h, w):  # zoom rounds its output size
    full = np.pad(full, ((0, h - full.shape[0]), (0, w - full.shape[1])), mode="edge")
  return (full / full.mean()).astype(np.float32)


def stretch_to_uint8(image: np.ndarray, low: float = 0.05, high: float = 99.95) -> np.ndarray:
  """[H, W] uint8: `image` from its `low`-th to its `high`-th percentile onto 0..255."""
  image = np.asarray(image, np.float32)
  lo, hi = np.percentile(image, (low, high))
  if not hi > lo:
    return np.zeros(image.shape, np.uint8)
  out = (image - lo) * (255.0 / (hi - lo))
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)
