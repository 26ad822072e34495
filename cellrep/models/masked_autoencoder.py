"""Microsnoop's masked CNN autoencoder (Xun et al. 2024): Cellpose's residual U-Net in Flax linen.

Microsnoop trains Cellpose's network (Stringer et al. 2021; its ``resdown``/``resup``
blocks, via scellseg) to fill in hidden patches of one-channel images, and embeds an image
as the L2-normalised spatial mean of the encoder's deepest map (Cellpose's "style").

Network, for ``widths`` (w_0, ..., w_{L-1}), default (32, 64, 128, 256):
- encoder level l (l = 0..L-1; a 2x2 / 2 max-pool before every level but the first):
  two residual units of pre-activation (BatchNorm-ReLU-Conv3x3) x 2; the first unit's
  shortcut is a 1x1 projection (BatchNorm-Conv1x1, Cellpose's ``batchconv0``) to w_l,
  the second's the identity. The paper's "four down-samplings" are these four encoder
  levels (Cellpose's four ``resdown`` blocks): with 4 widths there are 3 pools, maps at
  1, 1/2, 1/4 and 1/8 of the input's side. The number of levels follows ``widths``
  (5 widths: 4 pools), and H and W must be multiples of 2^(L-1).
- decoder level l (l = L-1..0): the mirror, as Cellpose's ``resup``: nearest-neighbour
  x2 upsampling (not at the deepest level, which takes the bottleneck itself), then two
  units to w_l; the skip (encoder level l's map) is *added*, as Cellpose adds it (its
  ``concatenation=False``, Microsnoop's setting), to the first unit's hidden map between
  its two convolutions. The first unit always has the 1x1 projection shortcut (also at the
  deepest level, w_{L-1} -> w_{L-1}, as Cellpose's).
- ``style=True`` (Microsnoop's and Cellpose's decoder): the embedding, through one Dense
  per convolution, is added to the input of every decoder convolution but each level's
  first (Cellpose's ``batchconvstyle``).
- head: BatchNorm-ReLU-Conv1x1 back to the input's C channels (any C; Microsnoop: 1).

Convolutions have biases; kernels have PyTorch's default initialisation, as the reference's
(biases start at zero, where PyTorch draws them uniform in ±1/sqrt(fan_in)).
``bn_momentum`` / ``bn_epsilon``: 0.95 / 1e-5 (PyTorch momentum 0.05, Cellpose's).
``dtype`` and ``conv_impl`` (`cellrep.ops.conv`; the max-pools follow it) are set by the
run's policy; parameters and batch statistics stay float32.

Masking (`cellrep.models.masking.patch_mask`): in training, or whenever ``mask_ratio`` is
passed to the call, round(ratio x patches) of the ``mask_patch`` x ``mask_patch`` patches of
each image are set to zero before the network sees them, drawn afresh per example from the
``mask`` RNG stream (per member and step in the train step). ``mask_ratio`` (0.25) is the
training default; at inference without a ratio nothing is hidden.

Output: ``{"reconstruction": [B, H, W, C] float32, "mask": [B, H, W] float32, 1 = hidden}``,
what `cellrep.train.objectives.MaskedReconstruction` scores against the unmasked inputs.
Named features (``capture=``): ``masked_input`` (what the network sees), ``encoder_<l>``,
``bottleneck`` (= encoder_<L-1>), ``embedding`` ([B, w_{L-1}] float32, unit L2 norm: 256-d
by default), ``decoder_<l>`` and ``reconstruction``.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cellrep.errors import BadValue
from cellrep.models.layers import Conv, Taps, check_choices
from cellrep.models.masking import patch_mask
from cellrep.ops.policy import CONV_IMPLS, DTYPES, dtype_name
from cellrep.ops.pool import max_pool

WIDTHS = (32, 64, 128, 256)
# PyTorch's default Conv2d / Linear weights (kaiming_uniform with a = sqrt(5)): U(+-1/sqrt(fan_in)).
_TORCH_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class BatchConv(nn.Module):
  """BatchNorm, ReLU (unless `relu` is False) and a k x k convolution: Cellpose's batchconv."""
  features: int
  kernel: int
  conv: Any
  norm: Any
  relu: bool = True

  @nn.compact
  def __call__(self, x):
    x = self.norm(name="bn")(x)
    if self.relu:
      x = nn.relu(x)
    return self.conv(self.features, (self.kernel, self.kernel), name="conv")(x)


class Level(nn.Module):
  """Two residual units to `features` channels at one resolution: Cellpose's resdown, or its
  resup when given the encoder's `skip` (added between the first unit's convolutions) and
  a `style` [B, S] (added, through a Dense each, before the 2nd, 3rd and 4th convolutions)."""
  features: int
  conv: Any
  norm: Any
  dtype: Any

  @nn.compact
  def __call__(self, x, skip=None, style=None):
    def bconv(i):
      return BatchConv(self.features, 3, self.conv, self.norm, name=f"conv_{i}")

    def styled(h, i):
      if style is None:
        return h
      s = nn.Dense(self.features, dtype=self.dtype, kernel_init=_TORCH_INIT, name=f"style_{i}")
      return h + s(style)[:, None, None, :]

    h = bconv(0)(x)
    if skip is not None:
      h = h + skip
    proj = BatchConv(self.features, 1, self.conv, self.norm, relu=False, name="proj")
    x = proj(x) + bconv(1)(styled(h, 1))
    return x + bconv(3)(styled(bconv(2)(styled(x, 2)), 3))


def _upsample(x):
  """Nearest-neighbour x2: [B, H, W, C] -> [B, 2H, 2W, C]."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class MaskedUNet(nn.Module):
  """`__call__(x [B, H, W, C], train, capture, mask_ratio) -> {"reconstruction", "mask"}`
  (with `capture`: (that, {name: feature})). mask_ratio: None = `self.mask_ratio` in
  training and none at inference; a number masks that fraction in either mode."""
  widths: Sequence[int] = WIDTHS
  style: bool = True
  mask_patch: int = 16
  mask_ratio: float = 0.25
  bn_momentum: float = 0.95
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False, capture: Sequence[str] = (),
               mask_ratio: float | None = None):
    taps = Taps(capture)
    b, h, w, c = x.shape
    side = 2 ** (len(self.widths) - 1)
    if h % side or w % side:
      raise BadValue("images", f"{h}x{w} images cannot be halved {len(self.widths) - 1} times "
                     f"({len(self.widths)} widths)", f"sides that are multiples of {side}")
    ratio = (self.mask_ratio if train else 0.0) if mask_ratio is None else mask_ratio
    if ratio:
      if h % self.mask_patch or w % self.mask_patch:
        raise BadValue("mask_patch", f"{self.mask_patch} px patches do not tile {h}x{w} images",
                       "a divisor of both sides")
      mask = patch_mask(self.make_rng("mask"), (b, h, w), self.mask_patch, ratio)
    else:
      mask = jnp.zeros((b, h, w), jnp.float32)
    x = taps("masked_input", jnp.where(mask[..., None] > 0, 0, x).astype(self.dtype))

    conv = functools.partial(Conv, dtype=self.dtype, impl=self.conv_impl, kernel_init=_TORCH_INIT)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype)
    skips = []
    for level, width in enumerate(self.widths):
      if level:
        x = max_pool(x, (2, 2), (2, 2), ((0, 0), (0, 0)), impl=self.conv_impl)
      x = taps(f"encoder_{level}", Level(width, conv, norm, self.dtype, name=f"encoder_{level}")(x))
      skips.append(x)
    taps("bottleneck", x)
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    embedding = taps("embedding", pooled * jax.lax.rsqrt(
        jnp.maximum(jnp.sum(jnp.square(pooled), axis=-1, keepdims=True), 1e-24)))
    style = embedding.astype(self.dtype) if self.style else None

    for level in reversed(range(len(self.widths))):
      if level < len(self.widths) - 1:
        x = _upsample(x)
      x = Level(self.widths[level], conv, norm, self.dtype, name=f"decoder_{level}")(
          x, skip=skips[level], style=style)
      taps(f"decoder_{level}", x)
    recon = BatchConv(c, 1, conv, norm, name="head")(x).astype(jnp.float32)
    return taps.result({"reconstruction": taps("reconstruction", recon), "mask": mask})


def create(name: str = "masked_unet", *, widths: Sequence[int] = WIDTHS, style: bool = True,
           mask_patch: int = 16, mask_ratio: float = 0.25, bn_momentum: float = 0.95,
           bn_epsilon: float = 1e-5, dtype: str = "float32",
           conv_impl: str = "auto") -> MaskedUNet:
  """Microsnoop's masked residual U-Net, its arguments checked (`BadValue` names one)."""
  if name != "masked_unet":
    raise BadValue("name", f"unknown masked autoencoder {name!r}", "masked_unet")
  if (isinstance(widths, (str, bytes)) or not hasattr(widths, "__len__") or not len(widths)
      or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in widths)):
    raise BadValue("widths", f"{widths!r}", "a non-empty sequence of positive channel counts")
  if not isinstance(style, bool):
    raise BadValue("style", f"{style!r}", "True or False")
  if not (isinstance(mask_patch, int) and not isinstance(mask_patch, bool) and mask_patch >= 1):
    raise BadValue("mask_patch", f"{mask_patch!r}", "a positive patch side in pixels")
  if not (isinstance(mask_ratio, (int, float)) and 0 <= mask_ratio <= 1):
    raise BadValue("mask_ratio", f"{mask_ratio!r}", "a fraction in [0, 1]")
  if not (isinstance(bn_momentum, (int, float)) and 0 <= bn_momentum < 1):
    raise BadValue("bn_momentum", f"{bn_momentum!r}", "a momentum in [0, 1)")
  if not (isinstance(bn_epsilon, (int, float)) and bn_epsilon > 0):
    raise BadValue("bn_epsilon", f"{bn_epsilon!r}", "a positive epsilon")
  check_choices(("dtype", dtype_name(dtype), DTYPES), ("conv_impl", conv_impl, CONV_IMPLS))
  return MaskedUNet(widths=tuple(widths), style=style, mask_patch=mask_patch,
                    mask_ratio=float(mask_ratio), bn_momentum=float(bn_momentum),
                    bn_epsilon=float(bn_epsilon), dtype=jnp.dtype(dtype), conv_impl=conv_impl)


MODELS = {"masked_unet": create}
