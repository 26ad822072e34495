"""2-D convolution with a choice of how XLA sees it: as a convolution or as a matrix product.

`Conv` has the parameters of `flax.linen.Conv` (one ``kernel`` [kh, kw, C_in,
C_out], same initialiser, same name), so a model gives the same numbers whichever
implementation it runs, and checkpoints move between them.

Implementations (`IMPLS`):

- ``xla``: `lax.conv_general_dilated`. The fast path on GPU/TPU.
- ``im2col``: the kh x kw shifted (strided) views of the padded input are
  concatenated along channels, [B, H', W', kh*kw*C_in], and multiplied by the
  kernel reshaped to [kh*kw*C_in, C_out]. Under `jax.vmap` over an ensemble's
  members this is a *batched matrix product* (batch = members), where a vmapped
  convolution becomes a grouped convolution (feature_group_count = members).
  XLA:CPU (jax 0.10) runs products near its matmul peak and convolutions, grouped
  or not, well below it: ResNet-18/50 train steps at 60 px ran 2-4x faster with
  im2col, one member or ten (benchmarks/bench_ensemble.py). The views are slices,
  so their gradient is a padded sum that XLA fuses:
  `lax.conv_general_dilated_patches` (an identity-kernel convolution) measured
  5-20x slower for this.
- ``auto``: ``im2col`` on a CPU, ``xla`` elsewhere (`resolve_conv_impl`).

The im2col copy costs kh*kw times the input's memory for 3x3 and 7x7
convolutions; 1x1 convolutions are a (strided) slice and a product, no copy.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "xla", "im2col")

Padding = str | Sequence[tuple[int, int]]


def resolve_conv_impl(impl: str, backend: str | None = None) -> str:
  """``auto`` -> ``im2col`` on CPU, ``xla`` elsewhere; other names pass through (checked)."""
  if impl not in IMPLS:
    raise ValueError(f"unknown conv implementation {impl!r}; known: {IMPLS}")
  if impl != "auto":
    return impl
  return "im2col" if (backend or jax.default_backend()) == "cpu" else "xla"


def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int] = (1, 1),
           padding: Padding = "SAME", impl: str = "xla") -> jax.Array:
  """A 2-D convolution (cross-correlation, as `lax.conv_general_dilated`).

  Args:
    x: [B, H, W, C_in] (NHWC).
    kernel: [kh, kw, C_in, C_out] (HWIO).
    strides: (sy, sx) in pixels.
    padding: "SAME", "VALID" or ((top, bottom), (left, right)) in pixels.
    impl: "xla" or "im2col" (see the module docstring); "auto" resolves per backend.

  Returns:
    [B, H', W', C_out], H' = (H + top + bottom - kh) // sy + 1 (and W' alike).
  """
  impl = resolve_conv_impl(impl)
  strides = tuple(int(s) for s in strides)
  if impl == "xla":
    return lax.conv_general_dilated(x, kernel, strides, padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
  padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  return _im2col_conv(x, kernel, strides, padding)


def _im2col_conv(x, kernel, strides, padding):
  kh, kw, cin, cout = kernel.shape
  (top, bottom), (left, right) = padding
  if top or bottom or left or right:
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  b, h, w, _ = x.shape
  sy, sx = strides
  ho, wo = (h - kh) // sy + 1, (w - kw) // sx + 1
  views = [lax.slice(x, (0, i, j, 0), (b, i + (ho - 1) * sy + 1, j + (wo - 1) * sx + 1, cin),
                     (1, sy, sx, 1))
           for i in range(kh) for j in range(kw)]
  # (i, j, c) order along the last axis matches kernel.reshape(kh * kw * C_in, C_out).
  cols = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
  return jnp.einsum("bhwk,ko->bhwo", cols, kernel.reshape(kh * kw * cin, cout))


class Conv(nn.Module):
  """`flax.linen.Conv` without bias for NHWC images, with a selectable implementation.

  Parameters: ``kernel`` [kh, kw, C_in, C_out] float32 (``bias`` [C_out] when use_bias).
  """
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Padding = "SAME"
  use_bias: bool = False
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C_in] -> [B, H', W', features] in `dtype`."""
    kernel = self.param("kernel", self.kernel_init,
                        tuple(self.kernel_size) + (x.shape[-1], self.features), jnp.float32)
    y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.padding,
               self.impl)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32
                         ).astype(self.dtype)
    return y
