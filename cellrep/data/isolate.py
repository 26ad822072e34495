"""The centre cell alone: a crop's markers kept inside the centre cell's mask (dilated by a
margin) and zero elsewhere.

Microsnoop crops single cells this way (its ``crop_inst`` "mask" mode: the instance's
pixels times its mask, zero-padded), for pretraining on segmented images and for
single-cell embeddings, so that an embedding describes the cell and not its neighbours.
Gupta, Moses & Lu (2025) propose the same masking beyond a margin against the background
sensitivity of crop models.

Crops are channel-first, as `cellrep.data.crops.CropSource` reads them: [B, K + 2, S, S],
the K markers, then the all-cells mask and the centre cell's mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cellrep.data.crops import CELL_CHANNEL, NUM_MASK_CHANNELS

OFF = -1  # the margin that turns isolation off


def cell_region(cell_mask: jax.Array, margin: int) -> jax.Array:
  """[B, S, S] cell masks (> 0 inside) -> float32 {0, 1} masks dilated by `margin` px (a
  (2 margin + 1)-px square, the chessboard distance)."""
  inside = (cell_mask > 0).astype(jnp.float32)
  if margin <= 0:
    return inside
  size = 2 * margin + 1
  return jax.lax.reduce_window(inside, 0.0, jax.lax.max, (1, size, size), (1, 1, 1), "SAME")


def isolate(crops: jax.Array, margin: int = 0) -> jax.Array:
  """crops [B, K + 2, S, S] -> the same with every marker zero outside the centre cell's
  mask dilated by `margin` px (the mask channels unchanged); `margin` OFF (-1) returns the
  crops as they are."""
  if margin == OFF:
    return crops
  if margin < 0:
    raise ValueError(f"margin {margin}: a number of px >= 0, or {OFF} for no isolation")
  keep = cell_region(crops[:, CELL_CHANNEL], margin)[:, None]
  k = crops.shape[1] - NUM_MASK_CHANNELS
  return jnp.concatenate([crops[:, :k] * keep.astype(crops.dtype), crops[:, k:]], axis=1)
