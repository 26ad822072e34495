"""Microsnoop's pretraining augmentation of one-channel crops, jitted, per sample.

  crops [B, 1, S, S] (the pool's one channel; a crop's mask channels dropped before)
  -> a window of input_size at a random offset in the crop (the centre when S = input_size)
  -> a random flip (horizontal) and a random number of 90° rotations (the 8 symmetries of
     the square, each equally likely)
  -> [B, input_size, input_size, 1] NHWC float32,

then the task normalises the window the network sees (Microsnoop: per image normalise99,
`cellrep.data.normalize.normalize99`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cellrep.errors import BadValue


@dataclasses.dataclass(frozen=True)
class PretrainAugmentConfig:
  """config.augment of the pretrain task."""
  flips: bool = True   # a random horizontal flip (with rot90: all 8 symmetries)
  rot90: bool = True   # a random multiple of 90°
  shift: bool = True   # a random window in the crop (else its centre)

  def __post_init__(self):
    for field in ("flips", "rot90", "shift"):
      if not isinstance(getattr(self, field), bool):
        raise BadValue(field, f"{getattr(self, field)!r}", "true or false")


def _rotate(x: jax.Array, k: jax.Array) -> jax.Array:
  """x [n, n, C] rotated by k x 90° (k traced)."""
  return jax.lax.switch(k, [lambda y, i=i: jnp.rot90(y, i, axes=(0, 1)) for i in range(4)], x)


def augment(rng: jax.Array, crops: jax.Array, input_size: int,
            cfg: PretrainAugmentConfig = PretrainAugmentConfig()) -> jax.Array:
  """crops [B, C, S, S] -> augmented windows [B, n, n, C] float32 (not normalised)."""
  b, _, s, s2 = crops.shape
  if s != s2 or s < input_size:
    raise ValueError(f"crops {s}x{s2} cannot give {input_size} px inputs")
  x = jnp.transpose(crops.astype(jnp.float32), (0, 2, 3, 1))
  k_shift, k_flip, k_rot = jax.random.split(rng, 3)
  if cfg.shift and s > input_size:
    starts = jax.random.randint(k_shift, (b, 2), 0, s - input_size + 1)
  else:
    starts = jnp.full((b, 2), (s - input_size) // 2)

  def one(image, start, flip, turns):
    window = jax.lax.dynamic_slice(image, (start[0], start[1], 0),
                                   (input_size, input_size, image.shape[-1]))
    window = jnp.where(flip, window[:, ::-1], window)
    return _rotate(window, turns)

  flip = jax.random.bernoulli(k_flip, 0.5, (b,)) & cfg.flips
  turns = jax.random.randint(k_rot, (b,), 0, 4) if cfg.rot90 else jnp.zeros((b,), jnp.int32)
  return jax.vmap(one)(x, starts, flip, turns)
