"""Max pooling with a gradient XLA:CPU runs fast.

`lax.reduce_window`'s gradient (select-and-scatter) reaches XLA:CPU as index
iotas, a gather and a scatter: in a ResNet-50 train step at 60 px the stem's one
3x3 / 2 max-pool took ~10% of the step. `max_pool` with ``impl`` other than
``xla`` takes the max over the window's strided views (as im2col takes them,
`cellrep.ops.conv`) and writes its gradient out: each view's share of dy where
it holds the max, first in window order (row-major) on ties, as reduce_window's
gradient routes them, padded back into place and summed, all fused elementwise.
``xla`` (what ``auto`` is on GPU/TPU) is `flax.linen.max_pool`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cellrep.ops.conv import like_primal, strided_views
from cellrep.ops.policy import resolve_conv_impl


def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
             padding: tuple[tuple[int, int], tuple[int, int]], impl: str = "xla") -> jax.Array:
  """Max over windows of x [B, H, W, C] (NHWC), outside the image counting as -inf.

  Returns [B, H', W', C], H' = (H + top + bottom - kh) // sy + 1 (and W' alike), as
  `flax.linen.max_pool(x, window, strides, padding)`.
  """
  window = tuple(int(k) for k in window)
  strides = tuple(int(s) for s in strides)
  padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  if resolve_conv_impl(impl) == "xla":
    return nn.max_pool(x, window, strides=strides, padding=padding)
  return _max_pool(x, window, strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, padding):
  return functools.reduce(jnp.maximum, strided_views(x, window, strides, padding, -jnp.inf)[0])


def _max_pool_fwd(x, window, strides, padding):
  y = _max_pool(x, window, strides, padding)
  return y, (x, y)


def _max_pool_bwd(window, strides, padding, residuals, dy):
  x, y = residuals
  views, (_, h, w, _) = strided_views(x, window, strides, padding, -jnp.inf)
  (kh, kw), (sy, sx) = window, strides
  _, ho, wo, _ = y.shape
  zero = jnp.zeros((), dy.dtype)
  taken = jnp.zeros(y.shape, bool)
  dx = None
  for (i, j), v in zip([(i, j) for i in range(kh) for j in range(kw)], views):
    hit = (v == y) & ~taken
    taken = taken | hit
    # A strided slice's transpose: dy's share padded back to its pixels (interior = stride - 1).
    share = lax.pad(jnp.where(hit, dy, zero), zero,
                    ((0, 0, 0), (i, h - i - (ho - 1) * sy - 1, sy - 1),
                     (j, w - j - (wo - 1) * sx - 1, sx - 1), (0, 0, 0)))
    dx = share if dx is None else dx + share
  (top, bottom), (left, right) = padding
  return (like_primal(dx[:, top:h - bottom, left:w - right], x),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
