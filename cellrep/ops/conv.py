"""2-D convolution with a choice of how XLA sees it: as a convolution or as a matrix product.

The kernels beneath `cellrep.models.layers.Conv` (which has the parameters of
`flax.linen.Conv`, so a model gives the same numbers whichever implementation it
runs, and checkpoints move between them).

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
  5-20x slower for this. The kernel's gradient is written out as one 2-D product
  cols^T dy (`_cols_product`): autodiff's form made XLA:CPU write dy transposed.
- ``winograd``: 3x3 stride-1 convolutions (on maps of 4x4 and more) by Winograd's
  minimal filtering F(m x m, 3 x 3) (Lavin & Gray 2016), m = 4 or 2 by the map's
  size: each (m + 2)^2 input tile is transformed by sums of strided views, the
  channels are mixed by (m + 2)^2 products [tiles, C_in] x [C_in, C_out] (2.25-4x
  fewer multiplications than im2col's, from a 2.25-4x rather than 9x copy of the
  input), and the tiles' products are transformed back. Every other convolution is
  im2col. Float32 results differ from a direct convolution by ~1e-6 relative. Its
  gradients are written out (`_winograd_bwd`: the input's is a Winograd
  convolution again, the kernel's taken in the transformed domain); autodiff
  through the transforms ran 1.5-2.4x slower than im2col.
- ``auto``: what `cellrep.ops.policy.resolve_conv_impl` chooses for the backend, the
  batch and the dtype (``xla`` on GPU/TPU; im2col or Winograd on a CPU).

Grouped convolutions (``feature_group_count`` G; kernel [kh, kw, C_in / G, C_out], as
`lax.conv_general_dilated`) work under every implementation: ``xla`` passes G on;
``im2col`` multiplies each group's columns by its own kernel (one product batched over
groups) and, for depthwise ones (C_in / G = 1, as EfficientNet's 3x3 and 5x5), sums the
window's views times the kernel's taps, elementwise, with no product at all; ``winograd``
handles dense 3x3 convolutions and leaves grouped ones to im2col.

bfloat16: the products take bfloat16 operands and accumulate in float32 (`_dot`), the
form XLA:CPU runs natively (YNNPACK; about twice the float32 rate on CPUs with
AVX512-BF16); results are cast back to the input's dtype. Winograd's transforms run in
float32, but rounding the transformed operands to bfloat16 costs accuracy: 2.3% relative
error per 3x3 layer against im2col's 0.29% (F(2x2, 3x3): 0.5%), for a predictor only 5%
faster, so ``auto`` uses im2col in bfloat16.

The im2col copy costs kh*kw times the input's memory for 3x3 and 7x7
convolutions; 1x1 convolutions are a (strided) slice and a product, no copy.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cellrep.ops.policy import resolve_conv_impl

Padding = str | Sequence[tuple[int, int]]


def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int] = (1, 1),
           padding: Padding = "SAME", impl: str = "xla", feature_group_count: int = 1
           ) -> jax.Array:
  """A 2-D convolution (cross-correlation, as `lax.conv_general_dilated`).

  Args:
    x: [B, H, W, C_in] (NHWC).
    kernel: [kh, kw, C_in / feature_group_count, C_out] (HWIO).
    strides: (sy, sx) in pixels.
    padding: "SAME", "VALID" or ((top, bottom), (left, right)) in pixels.
    impl: "xla", "im2col" or "winograd" (see the module docstring); "auto" resolves
      per backend (`cellrep.ops.policy.resolve_conv_impl`), as for training on this batch.
    feature_group_count: G groups of C_in / G input and C_out / G output channels.

  Returns:
    [B, H', W', C_out], H' = (H + top + bottom - kh) // sy + 1 (and W' alike).
  """
  impl = resolve_conv_impl(impl, batch=x.shape[0], dtype=x.dtype)
  strides = tuple(int(s) for s in strides)
  groups = int(feature_group_count)
  if x.shape[-1] != kernel.shape[2] * groups or kernel.shape[3] % groups:
    raise ValueError(f"input channels {x.shape[-1]} / kernel {kernel.shape} do not make "
                     f"{groups} groups")
  if impl == "xla":
    return lax.conv_general_dilated(x, kernel, strides, padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=groups)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
  padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  if groups > 1:
    return _grouped_im2col_conv(x, kernel, strides, padding, groups).astype(x.dtype)
  if impl == "winograd":
    tile = winograd_tile(x.shape[1:3], kernel.shape[:2], strides, padding)
    if tile:
      return _winograd(x, kernel, padding, tile).astype(x.dtype)
  return _im2col_conv(x, kernel, strides, padding).astype(x.dtype)


def _grouped_im2col_conv(x, kernel, strides, padding, groups):
  """A grouped convolution from the window's strided views, float32 result.

  Depthwise (one input channel per group, any channel multiplier): the sum over the
  window of each view times its tap, elementwise in float32 (a product with K = 1 would
  run far below peak). Otherwise each group's im2col columns [B, H', W', kh*kw*C_g] times
  its kernel [kh*kw*C_g, O_g]: one product batched over groups.
  """
  kh, kw, cg, cout = kernel.shape
  og = cout // groups
  if cg == 1:
    return _depthwise(x, kernel, strides, padding)
  views, _ = strided_views(x, (kh, kw), strides, padding)
  b, ho, wo, _ = views[0].shape
  cols = jnp.stack([v.reshape(b, ho, wo, groups, cg) for v in views], axis=-2)
  cols = cols.reshape(b, ho, wo, groups, kh * kw * cg)
  w = kernel.reshape(kh * kw, cg, groups, og).transpose(2, 0, 1, 3).reshape(groups, -1, og)
  return _dot("bhwgk,gko->bhwgo", cols, w).reshape(b, ho, wo, cout)


def _depthwise_sum(x, kernel, strides, padding):
  """The window's views of x times the kernel's taps, summed in float32: [B, H', W', C_out].

  Each tap's view is a strided slice of the unpadded input over the outputs it reaches,
  its product padded with zeros to the output's shape: 1.7-3x faster on XLA:CPU than the
  views of the padded input (whose padding the fusion evaluates at every read), and so is
  its gradient.
  """
  kh, kw, _, cout = kernel.shape
  b, h, w, groups = x.shape
  (top, bottom), (left, right) = padding
  sy, sx = strides
  ho, wo = (h + top + bottom - kh) // sy + 1, (w + left + right - kw) // sx + 1
  taps = kernel.astype(jnp.float32).reshape(kh, kw, groups, cout // groups)
  y = None
  for i in range(kh):
    h_lo, h_hi, xh = _tap_range(i, sy, top, h, ho)
    for j in range(kw):
      w_lo, w_hi, xw = _tap_range(j, sx, left, w, wo)
      if h_hi <= h_lo or w_hi <= w_lo:
        continue
      v = lax.slice(x, (0, xh, xw, 0), (b, xh + (h_hi - h_lo - 1) * sy + 1,
                                        xw + (w_hi - w_lo - 1) * sx + 1, groups), (1, sy, sx, 1))
      term = v.astype(jnp.float32)[..., None] * taps[i, j]
      term = jnp.pad(term, ((0, 0), (h_lo, ho - h_hi), (w_lo, wo - w_hi), (0, 0), (0, 0)))
      y = term if y is None else y + term
  if y is None:  # every tap in the padding
    y = jnp.zeros((b, ho, wo, groups, cout // groups), jnp.float32)
  return y.reshape(b, ho, wo, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x, kernel, strides, padding):
  """A depthwise convolution (kernel [kh, kw, 1, C_out], C_in groups), float32 result."""
  return _depthwise_sum(x, kernel, strides, padding)


def _depthwise_fwd(x, kernel, strides, padding):
  return _depthwise_sum(x, kernel, strides, padding), (x, kernel)


def _depthwise_bwd(strides, padding, residuals, dy):
  """The input's gradient by autodiff (padded sums of dy times the taps, one fusion); the
  kernel's by `_depthwise_kernel_grad`."""
  x, kernel = residuals
  dx = jax.vjp(lambda x: _depthwise_sum(x, kernel, strides, padding), x)[1](dy)[0]
  dk = _depthwise_kernel_grad(x, dy, kernel.shape, strides, padding)
  return like_primal(dx, x), like_primal(dk.astype(kernel.dtype), kernel)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)

# The kernel gradient's batch chunk: images whose x and dy take at most this many bytes.
DEPTHWISE_CHUNK_BYTES = 8 << 20
# Output rows summed per tap inside one fusion.
DEPTHWISE_ROWS = 16


def _tap_range(i: int, stride: int, pad: int, size: int, out: int) -> tuple[int, int, int]:
  """Output positions [lo, hi) whose tap i reads inside the input (not its padding), and the
  input position of lo."""
  lo = max(0, -((i - pad) // stride))
  hi = min(out, (size - 1 + pad - i) // stride + 1)
  return lo, max(lo, hi), i + stride * lo - pad


def _depthwise_kernel_grad(x, dy, kernel_shape, strides, padding):
  """sum over batch and space of each tap's view of x times dy: [kh, kw, 1, C_out] float32.

  Autodiff's form, one reduction per tap over [B, H', W', C] of a materialised view, ran as
  kh*kw passes over x and dy (half of an EfficientNet-B0 train step). Here each tap's view is
  a slice of the unpadded input over the outputs it reaches, `DEPTHWISE_ROWS` output rows
  are summed elementwise in one fusion, the taps' partial sums are stacked and reduced once,
  and the batch goes by chunks small enough that the taps' passes re-read x and dy from cache.
  """
  kh, kw, _, cout = kernel_shape
  b, h, w, groups = x.shape
  _, ho, wo, _ = dy.shape
  og = cout // groups
  (top, _), (left, _) = padding
  sy, sx = strides
  r = min(DEPTHWISE_ROWS, ho)
  nb = -(-ho // r)
  rows = [_tap_range(i, sy, top, h, ho) for i in range(kh)]
  cols = [_tap_range(j, sx, left, w, wo) for j in range(kw)]

  def window(a, start, limit, stride):  # slice rows and columns, keep the channel axes
    return lax.slice(a, (0, *start) + (0,) * (a.ndim - 3), (a.shape[0], *limit) + a.shape[3:],
                     (1, *stride) + (1,) * (a.ndim - 3))

  def chunk_sums(xc, dyc):  # [c, H, W, G(, 1)], [c, H', W', G(, O)] -> [kh * kw, G(, O)]
    c, zeros = xc.shape[0], ((0, 0),) * (dyc.ndim - 3)
    taps = []
    for h_lo, h_hi, xh in rows:
      for w_lo, w_hi, xw in cols:
        acc = None
        for q in range(r):
          n = -(-(h_hi - h_lo - q) // r)
          if n <= 0 or w_hi <= w_lo:
            continue
          xv = window(xc, (xh + sy * q, xw),
                      (xh + sy * q + (n - 1) * sy * r + 1, xw + (w_hi - w_lo - 1) * sx + 1),
                      (sy * r, sx))
          dv = window(dyc, (h_lo + q, w_lo), (h_lo + q + (n - 1) * r + 1, w_hi), (r, 1))
          term = xv.astype(jnp.float32) * dv.astype(jnp.float32)
          if n < nb:
            term = jnp.pad(term, ((0, 0), (0, nb - n), (0, 0)) + zeros)
          acc = term if acc is None else acc + term
        if acc is None:
          acc = jnp.zeros((c, nb, wo) + dyc.shape[3:], jnp.float32)
        elif w_hi - w_lo < wo:
          acc = jnp.pad(acc, ((0, 0), (0, 0), (w_lo, wo - w_hi)) + zeros)
        taps.append(acc)
    return jnp.sum(jnp.stack(taps, axis=3), axis=(0, 1, 2))

  if og > 1:  # each input channel times its og outputs
    x = x.reshape(b, h, w, groups, 1)
    dy = dy.reshape(b, ho, wo, groups, og)
  per_image = h * w * groups * x.dtype.itemsize + ho * wo * cout * dy.dtype.itemsize
  chunk = max([d for d in range(1, b + 1) if b % d == 0 and d * per_image <= DEPTHWISE_CHUNK_BYTES],
              default=1)
  if chunk == b:
    dk = chunk_sums(x, dy)
  else:
    split = lambda a: a.reshape(b // chunk, chunk, *a.shape[1:])
    dk, _ = lax.scan(lambda acc, a: (acc + chunk_sums(*a), None),
                     jnp.zeros((kh * kw,) + dy.shape[3:], jnp.float32), (split(x), split(dy)))
  return dk.reshape(kh, kw, 1, cout)


def _dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """einsum accumulating in float32, result float32. With bfloat16 operands XLA:CPU runs it
  as one bf16 x bf16 -> f32 product (YNNPACK, 2x the float32 rate with AVX512-BF16); with
  bfloat16 results it would convert both operands to float32 first."""
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def strided_views(x, kernel_size, strides, padding, value=0.0):
  """The kh * kw windows' strided views of x [B, H, W, C] padded by `padding` (with
  `value`), each [B, H', W', C], in row-major (i, j) order; and the padded shape."""
  kh, kw = kernel_size
  (top, bottom), (left, right) = padding
  if top or bottom or left or right:
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=value)
  b, h, w, c = x.shape
  sy, sx = strides
  ho, wo = (h - kh) // sy + 1, (w - kw) // sx + 1
  return [lax.slice(x, (0, i, j, 0), (b, i + (ho - 1) * sy + 1, j + (wo - 1) * sx + 1, c),
                    (1, sy, sx, 1))
          for i in range(kh) for j in range(kw)], x.shape


def _patches(x, kernel_size, strides, padding):
  """im2col: [B, H', W', kh*kw*C] of x padded by `padding`, in (i, j, c) order along the last
  axis, matching kernel.reshape(kh * kw * C_in, C_out)."""
  views, _ = strided_views(x, kernel_size, strides, padding)
  return views[0] if len(views) == 1 else _concatenate(views, axis=-1)


def _concatenate(arrays, axis: int):
  """jnp.concatenate; bfloat16 as its 16-bit pattern, which XLA:CPU copies as is (a bfloat16
  concatenation it runs in float32: converted, concatenated, converted back; 9% of a
  ResNet-50 predictor)."""
  if arrays[0].dtype != jnp.bfloat16:
    return jnp.concatenate(arrays, axis=axis)
  return _concatenate_bits(tuple(arrays), axis)


def _varying(x) -> frozenset:
  """The manual mesh axes x varies along (inside `jax.shard_map`; empty elsewhere)."""
  kind = getattr(jax.typeof(x), "manual_axis_type", None)
  return frozenset(kind.varying) if kind is not None else frozenset()


def like_primal(ct: jax.Array, primal: jax.Array) -> jax.Array:
  """A hand-written cotangent typed like its primal: summed over the manual mesh axes it
  varies along and the primal does not (as autodiff transposes the implicit broadcast).
  Inside `jax.shard_map` over members, an input shared by every member (images no member
  augments differently) gets the sum of the members' cotangents."""
  extra = _varying(ct) - _varying(primal)
  return lax.psum(ct, tuple(sorted(extra))) if extra else ct


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _concatenate_bits(arrays, axis):
  bits = [lax.bitcast_convert_type(a, jnp.uint16) for a in arrays]
  return lax.bitcast_convert_type(jnp.concatenate(bits, axis=axis), jnp.bfloat16)


def _concatenate_bits_fwd(arrays, axis):
  # Empty views of the inputs: their types (varying axes inside shard_map), not their data.
  return _concatenate_bits(arrays, axis), (tuple(a.shape[axis] for a in arrays),
                                            tuple(a.reshape(-1)[:0] for a in arrays))


def _concatenate_bits_bwd(axis, residuals, g):
  """The bitcasts have no gradient; the concatenation's is the cotangent split back."""
  sizes, empties = residuals
  parts = jnp.split(g, np.cumsum(sizes)[:-1].tolist(), axis=axis)
  return (tuple(like_primal(p, e) for p, e in zip(parts, empties)),)


_concatenate_bits.defvjp(_concatenate_bits_fwd, _concatenate_bits_bwd)


def _im2col_conv(x, kernel, strides, padding):
  kh, kw, cin, cout = kernel.shape
  cols = _patches(x, (kh, kw), strides, padding)
  return _cols_product(cols, kernel.reshape(kh * kw * cin, cout))


@jax.custom_vjp
def _cols_product(cols, w):
  """[B, H, W, K] x [K, O] -> [B, H, W, O] float32, with the kernel's gradient as one 2-D
  product."""
  return _dot("bhwk,ko->bhwo", cols, w)


def _cols_product_fwd(cols, w):
  return _cols_product(cols, w), (cols, w)


def _cols_product_bwd(residuals, dy):
  """Autodiff's kernel gradient, dot_general(dy, cols) over (b, h, w) transposed, made
  XLA:CPU write dy transposed ([O, B*H*W], by a second copy of the BatchNorm backward
  that produces dy: 13% of a ResNet-50 train step); as cols^T dy over rows flattened to
  2-D it reads both operands in place."""
  cols, w = residuals
  dy = dy.astype(cols.dtype)
  dw = _kernel_product(cols.reshape(-1, cols.shape[-1]), dy.reshape(-1, dy.shape[-1]))
  return (like_primal(_dot("bhwo,ko->bhwk", dy, w).astype(cols.dtype), cols),
          like_primal(dw.astype(w.dtype), w))


_cols_product.defvjp(_cols_product_fwd, _cols_product_bwd)


@jax.custom_batching.custom_vmap
def _kernel_product(cols, dy):
  """cols^T dy: [N, K] x [N, O] -> [K, O] float32 (`_dot`)."""
  return _dot("nk,no->ko", cols, dy)


@_kernel_product.def_vmap
def _kernel_product_vmap(axis_size, in_batched, cols, dy):
  """Both operands per member: one product batched over members. One operand shared by all
  members (images no member augments differently, at the stem): the other's members side
  by side in one 2-D product. Left to vmap, that product had a 3-D operand and no batch
  dimension, which XLA:CPU (jax 0.10) ran without converting bfloat16 operands
  ("Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32")."""
  cols_batched, dy_batched = in_batched
  if cols_batched and dy_batched:
    return _dot("mnk,mno->mko", cols, dy), True
  if dy_batched:
    m, n, o = dy.shape
    out = _kernel_product(cols, jnp.moveaxis(dy, 0, 1).reshape(n, m * o))
    return jnp.moveaxis(out.reshape(-1, m, o), 1, 0), True
  if cols_batched:
    m, n, k = cols.shape
    return _kernel_product(jnp.moveaxis(cols, 0, 1).reshape(n, m * k), dy).reshape(m, k, -1), True
  return _kernel_product(cols, dy), False


# Winograd F(m x m, 3 x 3) (Lavin & Gray 2016): y = A^T [(G g G^T) * (B^T d B)] A per
# (m + 2)^2 input tile d; interpolation points 0, +-1 (m = 2) and 0, +-1, +-2 (m = 4).
_WINOGRAD = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]),
        np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]]),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]])),
    4: (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                  [0, 1, -1, 8, -8, 1]])),
}


def winograd_tile(spatial, kernel_size, strides, padding) -> int:
  """The output tile m of a Winograd convolution for this shape, or 0 for im2col.

  Winograd needs a 3x3 kernel at stride 1; per output pixel it multiplies
  (m + 2)^2 / m^2 times per channel pair where im2col multiplies 9 times, plus
  the tiles' overhang past the map's edge. Maps under 4x4 stay im2col (a tile there
  is mostly overhang: 2x2 measured 3x slower), as do paddings over 2, where the
  input's gradient would need a negative one.
  """
  if tuple(kernel_size) != (3, 3) or tuple(strides) != (1, 1):
    return 0
  (top, bottom), (left, right) = padding
  ho, wo = spatial[0] + top + bottom - 2, spatial[1] + left + right - 2
  if min(ho, wo) < 4 or not all(0 <= p <= 2 for pair in padding for p in pair):
    return 0
  cost = {m: -(-ho // m) * -(-wo // m) * (m + 2) ** 2 for m in _WINOGRAD}
  return min(cost, key=lambda m: (cost[m], m))


def _combine(coefs, terms):
  """sum_i coefs[i] * terms[i], skipping zeros and multiplications by +-1."""
  out = None
  for c, t in zip(coefs, terms):
    if c == 0:
      continue
    t = t if c == 1 else -t if c == -1 else t * float(c)
    out = t if out is None else out + t
  return out


def _winograd_input(x, padding, m):
  """B^T d B of every (m + 2)^2 input tile d, summed in float32: ([(m + 2)^2, B * th * tw, C]
  in x's dtype, (th, tw))."""
  bt = _WINOGRAD[m][0]
  dtype, x = x.dtype, x.astype(jnp.float32)
  a = m + 2
  (top, bottom), (left, right) = padding
  b, h, w, cin = x.shape
  th, tw = -(-(h + top + bottom - 2) // m), -(-(w + left + right - 2) // m)
  # Pad so the tiles (stride m, size m + 2) cover the output; the overhang is cropped.
  x = jnp.pad(x, ((0, 0), (top, th * m + 2 - h - top), (left, tw * m + 2 - w - left), (0, 0)))
  # Sums of strided views: rows first, then columns.
  rows = [lax.slice_in_dim(x, i, i + (th - 1) * m + 1, m, axis=1) for i in range(a)]
  v = []
  for r in (_combine(bt[k], rows) for k in range(a)):
    cols = [lax.slice_in_dim(r, j, j + (tw - 1) * m + 1, m, axis=2) for j in range(a)]
    v += [_combine(bt[k], cols).astype(dtype) for k in range(a)]
  return _concatenate([t[None] for t in v], 0).reshape(a * a, b * th * tw, cin), (th, tw)


def _winograd_kernel(kernel, m):
  """G g G^T: [3, 3, C_in, C_out] -> [(m + 2)^2, C_in, C_out]; elementwise (as a product,
  K = 3 runs far below peak)."""
  g = _WINOGRAD[m][1]
  rows = [_combine(g[k], list(kernel)) for k in range(m + 2)]
  return jnp.stack([_combine(g[l], list(r)) for r in rows for l in range(m + 2)])


def _winograd_output(prod, m, batch, tiles, out_hw):
  """A^T M A of every tile's products [(m + 2)^2, B * th * tw, O] -> [B, H', W', O]."""
  at = _WINOGRAD[m][2]
  (th, tw), (ho, wo) = tiles, out_hw
  prod = prod.reshape(m + 2, m + 2, batch, th, tw, -1)
  rows = [_combine(at[p], list(prod)) for p in range(m)]
  # The m x m pixels of each tile into place.
  y = jnp.stack([jnp.stack([_combine(at[q], list(r)) for q in range(m)], axis=3) for r in rows],
                axis=2)
  return y.reshape(batch, th * m, tw * m, -1)[:, :ho, :wo]


def _winograd_apply(x, u, padding, m, spec="tpc,tco->tpo"):
  """x [B, H, W, C] padded by `padding` convolved with the transformed kernel u, whose
  channels `spec` contracts: one product per tile position, batch (m + 2)^2,
  [tiles, C_in] x [C_in, C_out]. The transforms run in float32, the products take their
  operands in x's dtype. Returns (y float32, the transformed input in x's dtype)."""
  (top, bottom), (left, right) = padding
  out_hw = (x.shape[1] + top + bottom - 2, x.shape[2] + left + right - 2)
  v, tiles = _winograd_input(x, padding, m)
  prod = _dot(spec, v, u.astype(x.dtype))
  return _winograd_output(prod, m, x.shape[0], tiles, out_hw), v


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _winograd(x, kernel, padding, m):
  """float32 result (operands of the products in x's dtype)."""
  return _winograd_apply(x, _winograd_kernel(kernel.astype(jnp.float32), m), padding, m)[0]


def _winograd_fwd(x, kernel, padding, m):
  y, v = _winograd_apply(x, _winograd_kernel(kernel.astype(jnp.float32), m), padding, m)
  return y, (v, kernel)


def _winograd_bwd(padding, m, residuals, dy):
  """Gradients without differentiating the transforms (their autodiff ran 1.5-2.4x slower
  than im2col). The input's is the convolution of dy with the kernel flipped and
  transposed (Winograd again); the kernel's is taken in the transformed domain: the
  transposed output transform spreads dy over the tiles' positions, one product
  [C_in, tiles] x [tiles, C_out] per position with the forward's transformed input,
  and the transposed kernel transform sums them back to 3 x 3."""
  v, kernel = residuals
  kh, kw, _, cout = kernel.shape
  b, ho, wo, _ = dy.shape
  a = m + 2
  at, g = _WINOGRAD[m][2], _WINOGRAD[m][1]
  back = tuple((kh - 1 - lo, kh - 1 - hi) for lo, hi in padding)
  tile = winograd_tile(dy.shape[1:3], (kh, kw), (1, 1), back)
  flipped = kernel[::-1, ::-1].astype(jnp.float32)
  if tile:
    # The flipped kernel's channels are swapped by the product, not by a transpose (which
    # XLA:CPU repeated in each of the transform's (m + 2)^2 terms).
    dx = _winograd_apply(dy.astype(v.dtype), _winograd_kernel(flipped, tile), back, tile,
                         "tpo,tco->tpc")[0]
  else:
    dx = _im2col_conv(dy.astype(v.dtype), jnp.transpose(flipped, (0, 1, 3, 2)).astype(v.dtype),
                      (1, 1), back)
  th, tw = -(-ho // m), -(-wo // m)
  dyt = jnp.pad(dy, ((0, 0), (0, th * m - ho), (0, tw * m - wo), (0, 0)))
  dyt = dyt.reshape(b, th, m, tw, m, cout)
  cols = [[_combine(at[:, l], [dyt[:, :, p, :, q] for q in range(m)]) for l in range(a)]
          for p in range(m)]
  dprod = jnp.stack([_combine(at[:, k], [cols[p][l] for p in range(m)])
                     for k in range(a) for l in range(a)]).reshape(a * a, b * th * tw, cout)
  du = _dot("tpc,tpo->tco", v, dprod.astype(v.dtype)).reshape(a, a, *kernel.shape[2:])
  rows = [[_combine(g[:, j], list(du[k])) for j in range(kw)] for k in range(a)]
  dk = jnp.stack([jnp.stack([_combine(g[:, i], [rows[k][j] for k in range(a)]) for j in range(kw)])
                  for i in range(kh)])
  return like_primal(dx.astype(v.dtype), v), like_primal(dk.astype(kernel.dtype), kernel)


_winograd.defvjp(_winograd_fwd, _winograd_bwd)
