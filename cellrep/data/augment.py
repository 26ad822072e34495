"""CellSighter's training augmentations, jitted and batched, on device.

`augment(rng, crops, input_size, cfg)` turns a batch of crop windows
`[B, C, S, S]` (channels 0..K-1 markers, K = C - 2; then two 0/1 masks, in
`cellrep.data.crops` order: C-2 all cells in the window, C-1 the centre cell)
into network inputs `[B, input_size, input_size, C]` (NHWC). Every random
choice is drawn per sample from `rng`; an ensemble gives each member its own
key (vmap or loop over keys: the function is pure in `rng`).

What CellSighter does (KerenLab/CellSighter: `data/transform.py` train_transform,
`data/shift_augmentation.py`, `data/data.py`, `train.py`, with the versions
pinned in `requirements.txt`: opencv-python 4.4, torchvision 0.9), in order:

1. Poisson resampling, always: markers <- Poisson(GaussianBlur(markers)) with
   `cv2.GaussianBlur(x, (5, 5), 0)`. Sigma 0 with ksize 5 makes OpenCV use its
   fixed binomial kernel [1, 4, 6, 4, 1] / 16 (standard deviation 1 px), border
   BORDER_REFLECT_101. Masks are not resampled.
2. Dilation of the centre-cell mask with p = 0.5, then of the all-cells mask
   with p = 0.5 (independent draws), kernel size k drawn from {2, 3, 5} with
   `np.ones(k, np.uint8)`. That kernel is 1-D: OpenCV 4.x reads it as a k x 1
   *column*, so CellSighter dilates vertically only (measured with
   opencv-python-headless 4.11; OpenCV 5 reads a 1-D array as a row instead).
   The anchor is k // 2, so for k = 2 pixel y takes max(y - 1, y).
3. `RandomRotation(degrees=(0, 360))`: angle ~ U[0, 360), counter-clockwise,
   about the window centre ((S - 1) / 2 in pixel coordinates), nearest
   neighbour (torchvision's default), zeros outside the window.
4. With p = 0.5 a `ShiftAugmentation`: each channel independently with p = 0.3
   is cut as `CenterCrop(input_size + 5)` then `RandomCrop(input_size)`, the
   rest as `CenterCrop(input_size)`. So a shifted channel's offset from the
   plain centre crop is, per axis, uniform over 6 consecutive integers whose
   first is set by torchvision's rounding: -2..3 for 60 -> 48 or for S = n,
   -3..2 for 26 -> 16. All channels take part, the masks included. Where the
   larger crop passes the window edge, torchvision pads zeros.
5. `CenterCrop(input_size)`.
6. `RandomHorizontalFlip(p=0.75)`, then `RandomVerticalFlip(p=0.75)`.

How cellrep does it, in the same order: 1 as a separable blur (two matmuls with
a banded matrix that folds in the reflect-101 border), then one uniform per
pixel through the Poisson quantile function (`poisson_quantile`); 2 as
`lax.reduce_window` max for each kernel size, selected per mask; 3-6 as ONE
gather: for each output pixel and channel the source pixel is found by undoing
the flips, the channel's crop offset and the rotation in turn, with
torchvision's centre, rounding (half to even, as `grid_sample`'s nearest mode)
and `CenterCrop` start (`round((S - crop) / 2)`, or its zero padding when
crop > S); a source outside the window, or in a shifted crop's padding, reads 0.
All random numbers come from one `jax.random.uniform` call (one generator to
compile: compiling threefry dominated this function's compile time).

Departures, and why:
- Poisson counts: exact below a rate of 12 (`poisson_exact_below`); at and
  above it a normal approximation with continuity correction and a
  Cornish-Fisher skewness term (total variation to the Poisson law 0.002 at
  rate 12, less above; mean exact, variance + 0.14). `jax.random.poisson`
  runs data-dependent while loops that draw fresh random numbers for the whole
  array on every pass: the whole augment of [64, 14, 60, 60] took 2.5-5 s on a
  2-core CPU with it, and compiled for 8-19 s.
- Negative Poisson rates are clipped to 0 (NumPy raises on them); raw counts
  never have any. For normalised data set `poisson=False`.
- Random numbers come from JAX keys, per sample, not NumPy's global state and
  torch's generator; the distributions are CellSighter's.
- `dilate_footprint="square"` (k x k, anchor k // 2 on both axes) is offered
  for those who read "kernel size k" as a square; the default is what
  CellSighter's pinned code does.
- Rotation coordinates are computed in float32 as torchvision does, but not by
  the same sequence of operations: a source coordinate within float rounding of
  a half-pixel may round to the neighbouring pixel.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from cellrep.errors import BadValue

# OpenCV's getGaussianKernel uses these fixed kernels when sigma <= 0 and ksize <= 7.
_CV2_SMALL_GAUSSIAN = {
    1: (1.0,),
    3: (0.25, 0.5, 0.25),
    5: (0.0625, 0.25, 0.375, 0.25, 0.0625),
    7: (0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125),
}
_FOOTPRINTS = ("column", "square")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """CellSighter's training augmentations; defaults are its values.

  Hashable (it is a static argument of the jitted `augment`).

  Attributes:
    enabled: False gives `center` (CellSighter's `aug: false`).
    poisson: resample markers as Poisson(blur(markers)); meaningful for raw counts only.
    blur_ksize: Gaussian kernel size in pixels, odd.
    blur_sigma: Gaussian standard deviation in pixels; <= 0 takes OpenCV's value for
      `blur_ksize` (for 5: the binomial kernel [1, 4, 6, 4, 1] / 16).
    poisson_exact_below: rates below this are sampled exactly, rates at or above it by a
      skew-corrected normal approximation (see `poisson_quantile`).
    dilate_p: probability of dilating each mask (drawn separately per mask).
    dilate_kernels: kernel sizes in pixels, one drawn uniformly per dilation.
    dilate_footprint: "column" (k x 1, CellSighter with OpenCV 4) or "square" (k x k).
    rotate: rotate by an angle drawn uniformly from [0, 360) degrees.
    shift_apply_p: probability that the per-channel shift step runs for a sample.
    shift_p: probability, within that step, that a channel is shifted.
    shift_max: the shifted channel is cut from a centre crop this many pixels larger.
    flip_p: probability of a horizontal flip, and separately of a vertical flip.
  """

  enabled: bool = True
  poisson: bool = True
  blur_ksize: int = 5
  blur_sigma: float = 0.0
  poisson_exact_below: float = 12.0
  dilate_p: float = 0.5
  dilate_kernels: tuple[int, ...] = (2, 3, 5)
  dilate_footprint: str = "column"
  rotate: bool = True
  shift_apply_p: float = 0.5
  shift_p: float = 0.3
  shift_max: int = 5
  flip_p: float = 0.75

  def __post_init__(self):
    # Lists from a ConfigDict would make the config unhashable, so unusable by jit.
    object.__setattr__(self, "dilate_kernels", tuple(int(k) for k in self.dilate_kernels))
    for name in ("dilate_p", "shift_apply_p", "shift_p", "flip_p"):
      p = getattr(self, name)
      if not 0.0 <= p <= 1.0:
        raise BadValue(name, f"is {p}", "a probability in [0, 1]")
    if self.blur_ksize < 1 or self.blur_ksize % 2 == 0:
      raise BadValue("blur_ksize", f"is {self.blur_ksize}", "an odd number >= 1")
    if not self.dilate_kernels or min(self.dilate_kernels) < 1:
      raise BadValue("dilate_kernels", f"is {self.dilate_kernels}",
                        "a non-empty tuple of sizes >= 1")
    if self.dilate_footprint not in _FOOTPRINTS:
      raise BadValue("dilate_footprint", f"is {self.dilate_footprint!r}",
                        f"one of {_FOOTPRINTS}")
    # exp(-rate) must not underflow float32 in the exact branch.
    if not 0.0 <= self.poisson_exact_below <= 80.0:
      raise BadValue("poisson_exact_below", f"is {self.poisson_exact_below}",
                        "a rate in [0, 80]")
    if self.shift_max < 0:
      raise BadValue("shift_max", f"is {self.shift_max}", "an integer >= 0")


def center_start(size: int, crop: int) -> int:
  """First row (or column) of torchvision's `CenterCrop(crop)` of a `size` window.

  Negative when crop > size: torchvision then pads (crop - size) // 2 zeros first.
  """
  if crop > size:
    return -((crop - size) // 2)
  return int(round((size - crop) / 2.0))


def _check(crops: jax.Array, input_size: int) -> None:
  if crops.ndim != 4 or crops.shape[2] != crops.shape[3]:
    raise ValueError(f"crops must be [B, C, S, S], got {crops.shape}")
  if input_size < 1:
    raise ValueError(f"input_size must be >= 1, got {input_size}")


@functools.partial(jax.jit, static_argnames=("input_size",))
def center(crops: jax.Array, input_size: int) -> jax.Array:
  """Eval-time input: no augmentation, the centre crop, NHWC.

  Args:
    crops: [B, C, S, S] windows (markers, then the two masks).
    input_size: side of the network input in pixels; larger than S pads zeros.

  Returns:
    [B, input_size, input_size, C] float32, as torchvision's `CenterCrop`.
  """
  _check(crops, input_size)
  size = crops.shape[-1]
  start = center_start(size, input_size)
  x = crops.astype(jnp.float32)
  if start < 0:
    lo = -start
    hi = input_size - size - lo
    x = jnp.pad(x, ((0, 0), (0, 0), (lo, hi), (lo, hi)))
    start = 0
  x = x[:, :, start:start + input_size, start:start + input_size]
  return jnp.transpose(x, (0, 2, 3, 1))


def _gaussian_taps(ksize: int, sigma: float) -> np.ndarray:
  """OpenCV's getGaussianKernel(ksize, sigma) as float32 taps that sum to 1."""
  if sigma <= 0 and ksize in _CV2_SMALL_GAUSSIAN:
    return np.asarray(_CV2_SMALL_GAUSSIAN[ksize], np.float32)
  if sigma <= 0:
    sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
  t = np.arange(ksize, dtype=np.float64) - (ksize - 1) / 2
  w = np.exp(-t * t / (2 * sigma * sigma))
  return (w / w.sum()).astype(np.float32)


def _blur_matrix(size: int, taps: np.ndarray) -> np.ndarray:
  """[size, size] M with (x @ M)[o] = sum_i taps[i] x[o + i - r], reflect-101 at the edges."""
  r = len(taps) // 2
  m = np.zeros((size, size), np.float32)
  for o in range(size):
    for i, w in enumerate(taps):
      j = o + i - r
      # OpenCV's BORDER_REFLECT_101: the edge pixel is not repeated (gfedcb|abcdefgh|gfedcba).
      j = -j if j < 0 else j
      j = 2 * (size - 1) - j if j >= size else j
      m[j, o] += w
  return m


def gaussian_blur(x: jax.Array, ksize: int = 5, sigma: float = 0.0) -> jax.Array:
  """`cv2.GaussianBlur(x, (ksize, ksize), sigma)` over the last two axes.

  A separable blur as two matmuls with a banded [S, S] matrix that folds in the
  border: on a CPU this beat shifted-slice sums and depthwise convolution.

  Args:
    x: [..., S, S] float32; S > ksize // 2 (reflect-101 border, OpenCV's default).

  Returns:
    [..., S, S] float32.
  """
  r = ksize // 2
  if r == 0:
    return x
  size = x.shape[-1]
  if min(x.shape[-2:]) <= r or x.shape[-2] != size:
    raise ValueError(
        f"window {x.shape[-2:]} must be square and larger than {r} for a {ksize}-tap blur")
  m = jnp.asarray(_blur_matrix(size, _gaussian_taps(ksize, sigma)))
  hi = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes on accelerators: rates stay float32
  x = jnp.einsum("...ij,jk->...ik", x, m, precision=hi)
  return jnp.einsum("...ij,ik->...kj", x, m, precision=hi)


def _exact_poisson_steps(exact_below: float) -> int:
  """Inversion steps after which a Poisson(rate < exact_below) pmf is below float32 resolution."""
  eps = float(np.finfo(np.float32).eps)
  k = int(math.ceil(exact_below))
  while k * math.log(max(exact_below, 1e-30)) - exact_below - math.lgamma(k + 1) > math.log(eps):
    k += 1
  return k + 1


def poisson_quantile(u: jax.Array, rate: jax.Array, exact_below: float = 12.0) -> jax.Array:
  """The Poisson(rate) quantile of u: a Poisson draw when u ~ U[0, 1).

  Below `exact_below` this is exact inversion (smallest k with CDF(k) >= u), run
  for a fixed number of steps (a loop holding three arrays); the count stops
  once a term no longer changes the float32 CDF, so a u above the CDF's float32
  plateau gets the last representable quantile rather than a runaway count.
  At and above `exact_below` it is the normal approximation with continuity
  correction and a Cornish-Fisher skewness term,
  floor(rate + sqrt(rate) z + (z^2 - 1) / 6 + 1/2) with z = Phi^-1(u), clipped at 0.

  Args:
    u: float32 uniforms in [0, 1), any shape.
    rate: float32 Poisson means, broadcastable to u; negative rates count as 0.

  Returns:
    float32 counts, u's shape.
  """
  rate = jnp.maximum(rate, 0.0)
  small = rate < exact_below
  lam = jnp.where(small, rate, 0.0)
  p = jnp.exp(-lam)
  cdf = p
  count = jnp.zeros(jnp.broadcast_shapes(u.shape, rate.shape), jnp.float32)
  steps = _exact_poisson_steps(exact_below)
  inverse = jnp.asarray([1.0 / k for k in range(1, steps + 1)], jnp.float32)

  def step(k, carry):
    p, cdf, count = carry
    p = p * lam * inverse[k - 1]
    nxt = cdf + p
    # X >= k iff CDF(k - 1) < u; a term that leaves the CDF unchanged ends the count.
    return p, nxt, count + ((cdf < u) & (nxt > cdf)).astype(jnp.float32)

  # A loop, not unrolled: XLA:CPU kept every unrolled step's arrays live at once (40 x the
  # crops: 1.2 GB of a 47-channel batch of 64), where the loop holds three.
  p, cdf, count = jax.lax.fori_loop(1, steps + 1, step, (jnp.broadcast_to(p, count.shape),
                                                         jnp.broadcast_to(cdf, count.shape), count))
  tiny = float(np.finfo(np.float32).eps) / 2
  z = jax.scipy.special.ndtri(jnp.clip(u, tiny, 1.0 - tiny))
  big = jnp.where(small, 1.0, rate)
  approx = jnp.maximum(jnp.floor(big + jnp.sqrt(big) * z + (z * z - 1.0) / 6.0 + 0.5), 0.0)
  return jnp.where(small, count, approx)


def dilate(masks: jax.Array, ksize: int, footprint: str = "column") -> jax.Array:
  """`cv2.dilate(masks, kernel)` over the last two axes, default anchor (k // 2).

  Args:
    masks: [..., S, S] float32.
    ksize: kernel size k in pixels.
    footprint: "column" for CellSighter's `np.ones(k)` under OpenCV 4 (k rows x 1 col),
      "square" for k x k.

  Returns:
    [..., S, S]: pixel (y, x) holds the max over rows y - k//2 .. y - k//2 + k - 1
    (and the same columns for "square"); outside the window counts as -inf.
  """
  lo, hi = ksize // 2, ksize - 1 - ksize // 2
  lead = masks.ndim - 2
  window = (1,) * lead + (ksize, ksize if footprint == "square" else 1)
  padding = ((0, 0),) * lead + ((lo, hi), (lo, hi) if footprint == "square" else (0, 0))
  return jax.lax.reduce_window(masks, -jnp.inf, jax.lax.max, window, (1,) * masks.ndim, padding)


def _uniform_index(u: jax.Array, n: int) -> jax.Array:
  """An integer uniform on 0..n-1 from u ~ U[0, 1)."""
  return jnp.minimum(jnp.floor(u * n).astype(jnp.int32), n - 1)


def _random_dilate(u: jax.Array, masks: jax.Array, cfg: AugmentConfig) -> jax.Array:
  """Each [S, S] mask of masks [B, 2, S, S] dilated with p = dilate_p by a random kernel.

  u: [B, 2, 2] uniforms, per mask: (gate, kernel choice).
  """
  if cfg.dilate_p == 0.0:
    return masks
  gate = u[..., 0] < cfg.dilate_p
  choice = _uniform_index(u[..., 1], len(cfg.dilate_kernels))
  out = masks
  for i, k in enumerate(cfg.dilate_kernels):
    pick = (gate & (choice == i))[:, :, None, None]
    out = jnp.where(pick, dilate(masks, k, cfg.dilate_footprint), out)
  return out


def warp(crops: jax.Array, input_size: int, angle: jax.Array, starts: jax.Array,
         flip_h: jax.Array, flip_v: jax.Array, rotate: bool = True) -> jax.Array:
  """Rotation, per-channel crop offsets, centre crop and flips as one gather.

  Args:
    crops: [B, C, S, S] float32 windows.
    input_size: n, side of the output in pixels.
    angle: [B] rotation in degrees, counter-clockwise about ((S-1)/2, (S-1)/2).
    starts: [B, C, 2] int32 (row, column) in the rotated window of each channel's n x n
      crop; `center_start(S, n)` on both axes is the plain centre crop.
    flip_h, flip_v: [B] bool, flip the n x n crop left-right / up-down.
    rotate: False skips the rotation arithmetic (angle must then be 0).

  Returns:
    [B, n, n, C] float32; pixels whose source leaves the window are 0.
  """
  b, c, s, _ = crops.shape
  n = input_size
  iota = jnp.arange(n, dtype=jnp.int32)
  # Undo the flips: output (y, x) reads the unflipped crop at (y1, x1).
  y1 = jnp.where(flip_v[:, None], n - 1 - iota, iota)[:, :, None, None]  # [B, n, 1, 1]
  x1 = jnp.where(flip_h[:, None], n - 1 - iota, iota)[:, None, :, None]  # [B, 1, n, 1]
  # Undo the crop: position in the rotated window, per channel.
  y2 = y1 + starts[:, None, None, :, 0]  # [B, n, n, C]
  x2 = x1 + starts[:, None, None, :, 1]
  valid = (y2 >= 0) & (y2 < s) & (x2 >= 0) & (x2 < s)
  if rotate:
    # Undo the rotation (torchvision's inverse matrix for a counter-clockwise angle).
    theta = jnp.deg2rad(angle.astype(jnp.float32))[:, None, None, None]
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    mid = (s - 1) / 2.0
    dy = y2.astype(jnp.float32) - mid
    dx = x2.astype(jnp.float32) - mid
    ys = jnp.round(sin * dx + cos * dy + mid).astype(jnp.int32)
    xs = jnp.round(cos * dx - sin * dy + mid).astype(jnp.int32)
    valid &= (ys >= 0) & (ys < s) & (xs >= 0) & (xs < s)
  else:
    ys, xs = y2, x2
  channel = jnp.arange(c, dtype=jnp.int32)
  index = jnp.where(valid, (channel * s + ys) * s + xs, 0)  # into one sample's [C, S, S]
  flat = crops.astype(jnp.float32).reshape(b, c * s * s)
  out = jax.vmap(lambda xb, ib: jnp.take(xb, ib, mode="clip"))(flat, index)
  return jnp.where(valid, out, 0.0)


def _random_geometry(u_sample: jax.Array, u_channel: jax.Array, size: int, input_size: int,
                     cfg: AugmentConfig):
  """Per-sample angle [B], per-channel crop starts [B, C, 2], flips [B] x 2.

  u_sample: [B, 4] uniforms (angle, shift step, horizontal flip, vertical flip);
  u_channel: [B, C, 3] uniforms (shift gate, row offset, column offset).
  """
  batch, channels = u_channel.shape[:2]
  if cfg.rotate:
    angle = 360.0 * u_sample[:, 0]
  else:
    angle = jnp.zeros((batch,), jnp.float32)
  plain = center_start(size, input_size)
  starts = jnp.full((batch, channels, 2), plain, jnp.int32)
  if cfg.shift_max > 0 and cfg.shift_apply_p > 0 and cfg.shift_p > 0:
    shifted = (u_sample[:, 1:2] < cfg.shift_apply_p) & (u_channel[..., 0] < cfg.shift_p)
    # RandomCrop(n) inside CenterCrop(n + shift_max): an offset in [0, shift_max] per axis.
    offset = _uniform_index(u_channel[..., 1:], cfg.shift_max + 1)
    wide = center_start(size, input_size + cfg.shift_max) + offset
    starts = jnp.where(shifted[:, :, None], wide, starts)
  flip_h = u_sample[:, 2] < cfg.flip_p
  flip_v = u_sample[:, 3] < cfg.flip_p
  return angle, starts, flip_h, flip_v


@functools.partial(jax.jit, static_argnames=("input_size", "cfg"))
def augment(rng: jax.Array, crops: jax.Array, input_size: int,
            cfg: AugmentConfig = AugmentConfig()) -> jax.Array:
  """CellSighter's training transform for one ensemble member's view of a batch.

  Args:
    rng: one PRNG key (vmap over a stack of keys for several members).
    crops: [B, C, S, S] float32 windows: channels 0..C-3 markers (raw counts when
      `cfg.poisson`), C-2 and C-1 the all-cells and centre-cell masks (0/1).
    input_size: n, side of the network input in pixels (CellSighter's crop_input_size).
    cfg: which augmentations, with what probabilities (static).

  Returns:
    [B, n, n, C] float32 NHWC; masks stay 0/1, markers are counts when resampled.
  """
  _check(crops, input_size)
  if crops.shape[1] < 3:
    raise ValueError(f"crops must be [B, C >= 3, S, S] (markers + 2 masks), got {crops.shape}")
  if not cfg.enabled:
    return center(crops, input_size)
  b, c, s, _ = crops.shape
  x = crops.astype(jnp.float32)
  markers, masks = x[:, :-2], x[:, -2:]
  # Every random number from one draw: one random-bit generator to compile instead of
  # one per choice (compiling threefry dominates the compile time of this function).
  n_params = b * (8 + 3 * c)
  n_counts = markers.size if cfg.poisson else 0
  u_all = jax.random.uniform(rng, (n_params + n_counts,), jnp.float32)
  u = u_all[:n_params].reshape(b, 8 + 3 * c)
  if cfg.poisson:
    rate = gaussian_blur(markers, cfg.blur_ksize, cfg.blur_sigma)
    markers = poisson_quantile(u_all[n_params:].reshape(markers.shape), rate,
                               cfg.poisson_exact_below)
    # Left to itself XLA fuses the sampling recurrence into the gather below, where it
    # runs unvectorised once per output pixel: the whole augment took 2x longer on a
    # 2-core CPU. XLA does not fuse through a dot (and drops optimization_barrier on a
    # CPU), so an identity matmul over the K markers, exact at HIGHEST precision, makes
    # it compute the counts once, in [B, K, S, S] order.
    eye = jnp.eye(markers.shape[1], dtype=jnp.float32)
    markers = jnp.einsum("bkij,kl->blij", markers, eye, precision=jax.lax.Precision.HIGHEST)
  masks = _random_dilate(u[:, 4:8].reshape(b, 2, 2), masks, cfg)
  x = jnp.concatenate([markers, masks], axis=1)
  angle, starts, flip_h, flip_v = _random_geometry(
      u[:, :4], u[:, 8:].reshape(b, c, 3), s, input_size, cfg)
  return warp(x, input_size, angle, starts, flip_h, flip_v, rotate=cfg.rotate)
