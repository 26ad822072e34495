"""DeepProfiler's training augmentations for the Cell Painting CNN, jitted and batched.

`augment(rng, crops, input_size, cfg)` turns a batch of single-cell windows
`[B, C, S, S]` (marker channels only, values as stored: 0..255 after
DeepProfiler's 8-bit stretch) into network inputs `[B, n, n, C]` (NHWC,
n = input_size <= S, the centre n x n region of each window), each channel of
each crop standardised. `center` is the eval-time input: the same region and
standardisation, nothing random. Every random choice is drawn per sample from
`rng`, and the functions are pure in it.

What DeepProfiler does (cytomining/DeepProfiler, `deepprofiler/imaging/augmentations.py`:
`augment`, mapped over a batch by `augment_multiple` inside the Keras
`AugmentationLayer` that `plugins/models/{cnn,resnet,efficientnet}.py` put in
front of the network when training; the ResNet and EfficientNet plugins only
when `train.model.augmentations` is true), per image, in order:

1. `random_crop`: with p = 0.5 (one uniform < 0.5) a square side is drawn as an
   integer uniform in [int(0.8 w), w): `tf.random.uniform(..., dtype=tf.int32)`
   excludes maxval, so 102..127 for w = 128 and the full side never comes up in
   this branch. `tf.image.random_crop` places it at a uniform integer offset, and
   `tf.image.resize` brings it back to w x w: TF2's bilinear with half-pixel
   centres, no antialiasing (upsampling, so none would apply), edges clamped.
2. `random_flips`: `tf.image.random_flip_left_right` (p = 0.5), then
   `tf.image.rot90` by k quarter turns counter-clockwise, k uniform in {0, 1, 2, 3}.
   Together a uniform draw from the 8 symmetries of the square; there is no
   separate vertical flip (a left-right flip and a half turn make one).
3. `random_illumination`, per channel: `tf.image.adjust_brightness` adds a delta
   ~ U[-0.1, 0.1), then `tf.image.adjust_contrast` maps x to
   (x - mean) * f + mean with f ~ U[0.8, 1.2) and the mean over the channel's
   pixels. Each channel goes through `grayscale_to_rgb` and back through
   `rgb_to_grayscale`, whose weights 0.2989 + 0.5870 + 0.1140 sum to 0.9999, so
   the round trip also scales every value by 0.9999.

What the images are when they arrive: the TF2 trainer (`deepprofiler/learning/tf2train.py`,
`make_dataset.fold_channels`) divides by 255 and standardises each channel of each
crop (NumPy mean and population std, no epsilon) *before* the model, so the
augmentation acts on standardised crops and the brightness delta is in units of
a channel's std. The older crop generators (`deepprofiler/imaging/cropping.py`
`fold_channels`, used by `plugins/crop_generators/sampled_crop_generator.py`) only
divide by 255 (their standardisation is commented out), so there the delta is a
tenth of the 8-bit range. Nothing renormalises after the augmentation: the jittered
crops go straight into the network.

How this module does it: step 1 and step 2 as ONE bilinear resampling. For each
sample the inverse of (flip, quarter turns) is an integer 2 x 2 matrix D on
centred pixel coordinates; composed with the crop's scale and offset it gives a
per-sample affine map from output pixel (i, j) to a source position in the
n x n region, clamped to the region's edge as TF's resize clamps. Four gathers
of whole channel vectors ([S * S, C] rows) and a bilinear blend finish it. With
no crop the map is D on integers and every weight is 0 or 1, so the resampled
crop is an exact permutation of the centre region's pixels (its standardised
values may differ from the centre's in the last bit: a float sum's rounding
depends on its order). Then each channel of each crop is standardised
(`standardize`), then step 3 is applied to the standardised values, where the
channel mean is 0 and adjust_contrast reduces to a scale: y = f z + delta. A
config with nothing random (`active` False) returns `center` itself.

Measured for [32, 5, 128, 128] -> 128 on a shared 2-core CPU, jitted, after
compile, medians of runs with random keys, resampling alone: one gather of
channel vectors ([S * S, C] rows) 7 ms, one gather per element of [B, C * S * S]
7-8 ms, separable matmuls with the symmetry folded into per-sample weight
matrices 29-32 ms, `jax.image.scale_and_translate` under vmap followed by
selected flips and rotations 43-49 ms. Hence the gather. The whole `augment`
17-19 ms (standardising the NHWC result is most of the rest), `center` 2-3 ms.

Departures, and why:
- The crop side is continuous, s * n with s ~ U[crop_min, crop_max], at a
  continuous uniform offset, not an integer side in [int(0.8 n), n) at an integer
  offset; the range includes the full side (s = 1 is a pure symmetry). One affine
  map then covers every case and the scale does not depend on n's rounding.
- With `flips`, left-right and up-down flips are drawn independently (p = 0.5
  each). With `rot90` as well this is the same uniform law over the 8 symmetries
  as DeepProfiler's; with `flips` alone it is the 4 symmetries {identity,
  left-right, up-down, half turn}, which DeepProfiler does not offer separately.
- Standardisation happens after the crop and symmetry, not before them: a
  symmetry does not change a channel's mean and std, and after a zoom the input
  is standardised on the pixels the network sees rather than on ones cropped
  away. With brightness and contrast off the output is exactly standardised
  (mean 0, std 1 per channel); with them on its channel means are the deltas and
  its stds the factors (in DeepProfiler's TF2 path too, up to the drift a zoom
  adds to statistics taken before it).
- No renormalisation after the brightness and contrast changes: standardising
  again would cancel them exactly (a shift and a positive scale leave a
  standardised channel unchanged). DeepProfiler does not renormalise either.
- A constant channel standardises to zeros (DeepProfiler's NumPy division gives
  NaN); `eps` bounds the std from below for nearly constant ones.
- The 0.9999 scale of DeepProfiler's grayscale round trip is not reproduced.
- Random numbers come from JAX keys, per sample, from one `jax.random.uniform`
  call; the distributions are DeepProfiler's apart from the above.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp

from cellrep.data.augment import center_start
from cellrep.data.normalize import standardize
from cellrep.errors import BadValue

# Inverses of k counter-clockwise quarter turns on centred (row, column) coordinates: output
# position p reads the unrotated image at _TURNS[k] @ p (np.rot90 and tf.image.rot90 order).
_TURNS = (((1, 0), (0, 1)), ((0, 1), (-1, 0)), ((-1, 0), (0, -1)), ((0, -1), (1, 0)))
# Per-sample uniforms (`source_map`'s u) before the per-channel ones.
_N_SAMPLE = 7


@dataclasses.dataclass(frozen=True)
class CellPaintingAugmentConfig:
  """DeepProfiler's training augmentations; defaults are its values.

  Hashable (it is a static argument of the jitted `augment`).

  Attributes:
    crop_p: probability of the random crop (resized back to the input size).
    crop_min, crop_max: the crop's side as a fraction of the input side, drawn
      uniformly from [crop_min, crop_max].
    flips: flip left-right and up-down, each with p = 0.5.
    rot90: turn by k quarter turns counter-clockwise, k uniform in {0, 1, 2, 3}.
    brightness: per channel, add a delta ~ U[-brightness, brightness], in units of
      the channel's std (the output is standardised first).
    contrast: per channel, scale by a factor ~ U[1 - contrast, 1 + contrast]
      about the channel's mean; below 1 so the factor stays positive.
  """

  crop_p: float = 0.5
  crop_min: float = 0.8
  crop_max: float = 1.0
  flips: bool = True
  rot90: bool = True
  brightness: float = 0.1
  contrast: float = 0.2

  def __post_init__(self):
    for name in ("crop_p", "crop_min", "crop_max", "brightness", "contrast"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise BadValue(name, f"is {value!r}", "a finite number")
    for name in ("flips", "rot90"):
      if not isinstance(getattr(self, name), bool):
        raise BadValue(name, f"is {getattr(self, name)!r}", "True or False")
    if not 0.0 <= self.crop_p <= 1.0:
      raise BadValue("crop_p", f"is {self.crop_p}", "a probability in [0, 1]")
    if not 0.0 < self.crop_min <= 1.0:
      raise BadValue("crop_min", f"is {self.crop_min}", "a fraction of the side in (0, 1]")
    if not self.crop_min <= self.crop_max <= 1.0:
      raise BadValue("crop_max", f"is {self.crop_max}", f"in [crop_min = {self.crop_min}, 1]")
    if self.brightness < 0.0:
      raise BadValue("brightness", f"is {self.brightness}", "a half-width >= 0")
    if not 0.0 <= self.contrast < 1.0:
      raise BadValue("contrast", f"is {self.contrast}", "a half-width in [0, 1)")

  @property
  def active(self) -> bool:
    """Whether anything is random; when not, `augment` is `center`."""
    return (self.crop_p > 0.0 or self.flips or self.rot90 or self.brightness > 0.0
            or self.contrast > 0.0)


def _check(crops: jax.Array, input_size: int) -> None:
  if crops.ndim != 4 or crops.shape[2] != crops.shape[3]:
    raise BadValue("crops", f"has shape {crops.shape}", "[B, C, S, S] marker channels")
  if not 1 <= input_size <= crops.shape[-1]:
    raise BadValue("input_size", f"is {input_size}", f"in [1, {crops.shape[-1]}] (the window side)")


@functools.partial(jax.jit, static_argnames=("input_size",))
def center(crops: jax.Array, input_size: int) -> jax.Array:
  """Eval-time input: the centre n x n region of each window, NHWC, standardised.

  Args:
    crops: [B, C, S, S] marker channels, values as stored.
    input_size: n <= S, side of the network input in pixels.

  Returns:
    [B, n, n, C] float32, each channel of each crop standardised (`standardize`).
  """
  _check(crops, input_size)
  start = center_start(crops.shape[-1], input_size)
  x = crops[:, :, start:start + input_size, start:start + input_size]
  # Reducing over the last two axes, then transposing, took a third of the time on a CPU.
  return jnp.transpose(standardize(x, axes=(2, 3)), (0, 2, 3, 1))


def source_map(u: jax.Array, input_size: int, cfg: CellPaintingAugmentConfig):
  """Per-sample affine map from output pixel (row, column) to a position in the n x n region.

  Args:
    u: [B, 7] uniforms in [0, 1): crop gate, crop scale, row offset, column offset,
      left-right flip, up-down flip, quarter turns.
    input_size: n, side of the region and of the output in pixels.
    cfg: which of crop, flips and quarter turns are on, and the crop's range.

  Returns:
    (a [B, 2, 2], t [B, 2]) float32: output (i, j) reads the region at a @ (i, j) + t
    (row, column, in pixel indices; `resample` clamps it to [0, n - 1]). Without a crop
    every entry is an integer.
  """
  batch = u.shape[0]
  n = input_size
  if cfg.crop_p > 0.0:
    scale = cfg.crop_min + (cfg.crop_max - cfg.crop_min) * u[:, 1]
    scale = jnp.where(u[:, 0] < cfg.crop_p, scale, 1.0)
  else:
    scale = jnp.ones((batch,), jnp.float32)
  # The crop's leading edge plus half a pixel, uniform over the places that keep the crop
  # (side scale * n) inside the region.
  offset = u[:, 2:4] * ((1.0 - scale) * n)[:, None]
  one = jnp.ones((batch,), jnp.float32)
  flip_lr = jnp.where(u[:, 4] < 0.5, -1.0, 1.0) if cfg.flips else one
  flip_ud = jnp.where(u[:, 5] < 0.5, -1.0, 1.0) if cfg.flips else one
  if cfg.rot90:
    turns = jnp.minimum(jnp.floor(u[:, 6] * 4).astype(jnp.int32), 3)
    d = jnp.asarray(_TURNS, jnp.float32)[turns]
  else:
    d = jnp.broadcast_to(jnp.eye(2, dtype=jnp.float32), (batch, 2, 2))
  # Undo the quarter turns, then the up-down flip (rows), then the left-right flip (columns).
  d = jnp.stack([flip_ud, flip_lr], axis=-1)[:, :, None] * d
  # Resized pixel r sits at offset + (r + 0.5) * scale - 0.5 in the region (TF2's resize with
  # half-pixel centres); r = d @ (p - mid) + mid. Every term is exact when scale == 1.
  mid = (n - 1) / 2.0
  a = scale[:, None, None] * d
  t = scale[:, None] * (mid + 0.5 - jnp.sum(d, axis=-1) * mid) - 0.5 + offset
  return a, t


def resample(crops: jax.Array, input_size: int, a: jax.Array, t: jax.Array) -> jax.Array:
  """Bilinear resampling of each window's centre region through a per-sample affine map.

  Args:
    crops: [B, C, S, S] float32.
    input_size: n <= S; the region is `center`'s n x n.
    a, t: [B, 2, 2] and [B, 2]: output (i, j) reads the region at a @ (i, j) + t (row,
      column, in pixel indices), clamped to the region's edge.

  Returns:
    [B, n, n, C] float32. Where a position is an integer the pixel is copied exactly.
  """
  b, c, s, _ = crops.shape
  n = input_size
  start = center_start(s, n)
  i = jnp.arange(n, dtype=jnp.float32)
  pos = (a[:, :, 0, None, None] * i[:, None] + a[:, :, 1, None, None] * i[None, :]
         + t[:, :, None, None])  # [B, 2, n, n]
  pos = jnp.clip(pos, 0.0, n - 1.0)
  low = jnp.floor(pos)
  frac = (pos - low)[..., None]  # [B, 2, n, n, 1]
  low = low.astype(jnp.int32)
  high = jnp.minimum(low + 1, n - 1)
  rows = (low[:, 0] + start, high[:, 0] + start)
  cols = (low[:, 1] + start, high[:, 1] + start)
  # Gathering [C] rows of an NHWC window was a little faster on a CPU than gathering single
  # values of [C * S * S], and it gives NHWC directly.
  image = jnp.transpose(crops.astype(jnp.float32), (0, 2, 3, 1)).reshape(b, s * s, c)
  take = jax.vmap(lambda im, index: jnp.take(im, index.reshape(-1), axis=0, mode="clip"))

  def read(r, q):
    return take(image, r * s + q).reshape(b, n, n, c)

  fy, fx = frac[:, 0], frac[:, 1]
  top = read(rows[0], cols[0]) * (1.0 - fx) + read(rows[0], cols[1]) * fx
  bottom = read(rows[1], cols[0]) * (1.0 - fx) + read(rows[1], cols[1]) * fx
  return top * (1.0 - fy) + bottom * fy


@functools.partial(jax.jit, static_argnames=("input_size", "cfg"))
def augment(rng: jax.Array, crops: jax.Array, input_size: int,
            cfg: CellPaintingAugmentConfig = CellPaintingAugmentConfig()) -> jax.Array:
  """DeepProfiler's training transform of a batch of Cell Painting crops.

  Args:
    rng: one PRNG key (vmap over a stack of keys for several views).
    crops: [B, C, S, S] marker channels, values as stored (0..255).
    input_size: n <= S, side of the network input in pixels (the centre region).
    cfg: which augmentations, with what ranges (static).

  Returns:
    [B, n, n, C] float32 NHWC: cropped and resized, flipped and turned, each channel
    standardised, then scaled by its contrast factor and shifted by its brightness delta.
  """
  _check(crops, input_size)
  if not cfg.active:
    # The same program as `center`, so bit for bit the same output (reduction order in
    # the standardisation depends on what XLA fuses into it).
    return center(crops, input_size)
  b, c = crops.shape[:2]
  # One draw for every choice: one random-bit generator to compile.
  u = jax.random.uniform(rng, (b, _N_SAMPLE + 2 * c), jnp.float32)
  a, t = source_map(u[:, :_N_SAMPLE], input_size, cfg)
  z = standardize(resample(crops, input_size, a, t))
  if cfg.contrast > 0.0:
    factor = 1.0 + cfg.contrast * (2.0 * u[:, _N_SAMPLE + c:] - 1.0)
    # adjust_contrast scales about the channel mean, which is 0 here.
    z = z * factor[:, None, None, :]
  if cfg.brightness > 0.0:
    delta = cfg.brightness * (2.0 * u[:, _N_SAMPLE:_N_SAMPLE + c] - 1.0)
    z = z + delta[:, None, None, :]
  return z
