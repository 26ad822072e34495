"""Random patch masks for masked-image models (Microsnoop's masked autoencoder and the like).

A mask hides a fraction of the square patches of each image, drawn afresh per
example from the key it is given (inside the train step: per member and step, from
the model's ``mask`` RNG stream, `cellrep.models.RNG_STREAMS`).
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp

from cellrep.errors import BadValue


def patch_mask(key: jax.Array, shape: tuple[int, int, int], patch: int, ratio: float) -> jax.Array:
  """[B, H, W] float32, 1 on the pixels of round(ratio x patches) randomly chosen patches of
  each image (patch x patch pixels; H and W multiples of `patch`), 0 elsewhere."""
  b, h, w = shape
  if h % patch or w % patch:
    raise BadValue("patch", f"{patch} px does not tile {h}x{w} images", "a divisor of both sides")
  if not 0 <= ratio <= 1:
    raise BadValue("ratio", f"{ratio}", "a fraction in [0, 1]")
  gh, gw = h // patch, w // patch
  n = gh * gw
  hidden = round(ratio * n)
  # The `hidden` patches of smallest random score, per image.
  scores = jax.random.uniform(key, (b, n))
  ranks = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
  chosen = (ranks < hidden).astype(jnp.float32)
  grid = einops.repeat(chosen, "b (gh gw) -> b (gh p) (gw q)", gh=gh, gw=gw, p=patch, q=patch)
  return grid

