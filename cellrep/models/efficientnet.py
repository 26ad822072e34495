"""EfficientNet-B0 (Tan & Le 2019) in Flax linen, laid out and named as Keras writes it.

The Cell Painting CNN (Moshkov et al. 2024, DeepProfiler) is a Keras EfficientNet-B0 on
5 channels; its single-cell features are ``block6a_activation`` (672 channels) averaged
over space. Modules and named features carry Keras' layer names (``stem_conv``,
``block2a_expand_conv``, ``block6a_activation``, ``top_conv``, ...), so a Keras HDF5
checkpoint maps onto the parameters by name (`cellrep.models.import_weights`).

Network: stem 3x3/2 to 32 channels; seven stages of MBConv blocks (expansion 1, then 6;
kernels 3,3,5,3,5,5,3; strides 1,2,2,2,1,2,1; widths 16,24,40,80,112,192,320; repeats
1,2,2,3,3,4,1), each block: 1x1 expansion (when > 1), depthwise k x k, squeeze-and-
excitation (squeeze to a quarter of the block's input channels), 1x1 projection, and a
residual sum (with stochastic depth) where the shape allows; head 1x1 to 1280, global
average, dropout, dense. Swish (SiLU) activations. Any number of input channels.

Options for weights from elsewhere:
- ``padding``: ``same`` pads stride-2 convolutions as TensorFlow/Keras do (more after
  than before); ``symmetric`` pads (k-1)/2 on every side as torchvision does;
- ``bn_epsilon`` / ``bn_momentum``: Keras' 1e-3 / 0.99 by default (torchvision's
  ``efficientnet_b0``: 1e-5 / 0.9);
- ``drop_connect``: the stochastic-depth rate of the last block (block b of B drops
  its residual branch with probability drop_connect * b / B, per sample, as both do);
  0 (off) by default; ``dropout`` before the classifier, 0.2.

Named features (``capture=``): ``stem_activation``; per block ``<p>expand_activation``
(blocks with expansion), ``<p>activation`` (after the depthwise convolution),
``<p>se_excite``, ``<p>project_bn`` and ``<p>add`` (residual blocks), with
p = ``block<stage><letter>_``; ``top_activation``; ``avg_pool`` (= ``pool``, float32)
and ``logits``. At a 128x128 input ``block6a_activation`` is [4, 4, 672].
"""

from __future__ import annotations

import functools
import string
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cellrep.errors import BadValue
from cellrep.models.layers import Conv, Taps, check_choices
from cellrep.ops.policy import CONV_IMPLS, DTYPES, dtype_name

# (expansion, kernel, stride, output channels, repeats) per stage.
B0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
             (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
STEM_CHANNELS, TOP_CHANNELS, SE_RATIO = 32, 1280, 0.25
PADDINGS = ("same", "symmetric")

# Keras' initialisers of EfficientNet (its CONV_KERNEL_INITIALIZER / DENSE_KERNEL_INITIALIZER).
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal")
# Keras computes a depthwise kernel's fan-out on its own layout [k, k, C, 1]: k * k. The same
# kernel here is [k, k, 1, C], whose fan-out would be k * k * C (weights sqrt(C) times too
# small, and under BatchNorm gradients sqrt(C) times too large: training from scratch stalls);
# its fan-in is Keras' fan-out.
_DEPTHWISE_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
# The classifier's: keras.applications' (fan-out 1/3: for ~1000 classes logits of sd ~0.4, but
# for a dozen treatments sd ~3, and a loss near 4 that stalls training from scratch), or
# Keras' default Dense init, glorot_uniform (DeepProfiler's own ClassProb layer on top of a
# headless EfficientNet).
HEAD_INITS = {"keras_applications": nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform"),
              "glorot_uniform": nn.initializers.glorot_uniform()}


def _pad(kernel: int, stride: int, style: str):
  """Padding of a k x k convolution: "SAME" (TensorFlow's) or (k-1)/2 on each side."""
  if style == "same" or stride == 1:
    return "SAME"
  return [((kernel - 1) // 2,) * 2] * 2


class MBConv(nn.Module):
  """One mobile inverted bottleneck block, its layers named as Keras' (``<prefix><layer>``)."""
  prefix: str
  filters_in: int
  filters_out: int
  expand: int
  kernel: int
  stride: int
  drop_rate: float
  conv: Any
  norm: Any
  padding: str
  taps: Any

  @nn.compact
  def __call__(self, x, train: bool):
    p, taps = self.prefix, self.taps
    inputs = x
    filters = self.filters_in * self.expand
    if self.expand != 1:
      x = self.conv(filters, (1, 1), name=f"{p}expand_conv")(x)
      x = taps(f"{p}expand_activation", nn.swish(self.norm(name=f"{p}expand_bn")(x)))
    x = self.conv(filters, (self.kernel, self.kernel), self.stride,
                  padding=_pad(self.kernel, self.stride, self.padding),
                  feature_group_count=filters, kernel_init=_DEPTHWISE_INIT, name=f"{p}dwconv")(x)
    x = taps(f"{p}activation", nn.swish(self.norm(name=f"{p}bn")(x)))
    squeezed = max(1, int(self.filters_in * SE_RATIO))
    se = jnp.mean(x, axis=(1, 2), keepdims=True)
    se = nn.swish(self.conv(squeezed, (1, 1), use_bias=True, name=f"{p}se_reduce")(se))
    se = nn.sigmoid(self.conv(filters, (1, 1), use_bias=True, name=f"{p}se_expand")(se))
    x = taps(f"{p}se_excite", x * se)
    x = self.conv(self.filters_out, (1, 1), name=f"{p}project_conv")(x)
    x = taps(f"{p}project_bn", self.norm(name=f"{p}project_bn")(x))
    if self.stride == 1 and self.filters_in == self.filters_out:
      if train and self.drop_rate > 0:
        keep = 1.0 - self.drop_rate
        rng = self.make_rng("drop_path")
        alive = jax.random.bernoulli(rng, keep, (x.shape[0], 1, 1, 1))
        x = jnp.where(alive, x / keep, 0).astype(x.dtype)
      x = taps(f"{p}add", x + inputs)
    return x


class EfficientNet(nn.Module):
  """EfficientNet-B0 classifier. `__call__(x [B, H, W, C], train, capture) -> logits`
  (with `capture`: (logits, {name: feature}))."""
  num_classes: int
  dropout: float = 0.2
  drop_connect: float = 0.0
  padding: str = "same"
  bn_epsilon: float = 1e-3
  bn_momentum: float = 0.99
  dtype: Any = jnp.float32
  conv_impl: str = "auto"
  head_init: str = "keras_applications"

  @nn.compact
  def __call__(self, x, train: bool = False, capture: Sequence[str] = ()):
    taps = Taps(capture)
    conv = functools.partial(Conv, use_bias=False, dtype=self.dtype, impl=self.conv_impl,
                             kernel_init=_CONV_INIT)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype)
    x = x.astype(self.dtype)
    x = conv(STEM_CHANNELS, (3, 3), 2, padding=_pad(3, 2, self.padding), name="stem_conv")(x)
    x = taps("stem_activation", nn.swish(norm(name="stem_bn")(x)))
    total = sum(stage[-1] for stage in B0_STAGES)
    b, filters_in = 0, STEM_CHANNELS
    for i, (expand, kernel, stride, filters_out, repeats) in enumerate(B0_STAGES):
      for j in range(repeats):
        prefix = f"block{i + 1}{string.ascii_lowercase[j]}_"
        x = MBConv(prefix, filters_in, filters_out, expand, kernel, stride if j == 0 else 1,
                   self.drop_connect * b / total, conv, norm, self.padding, taps,
                   name=prefix[:-1])(x, train)
        b, filters_in = b + 1, filters_out
    x = conv(TOP_CHANNELS, (1, 1), name="top_conv")(x)
    x = taps("top_activation", nn.swish(norm(name="top_bn")(x)))
    features = jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
    taps("avg_pool", features)
    taps("pool", features)
    features = nn.Dropout(self.dropout, deterministic=not train, name="top_dropout")(features)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=HEAD_INITS[self.head_init],
                      name="predictions")(features.astype(self.dtype))
    return taps.result(taps("logits", logits.astype(jnp.float32)))


def create(name: str = "efficientnet_b0", *, num_classes: int, dropout: float = 0.2,
           drop_connect: float = 0.0, padding: str = "same", bn_epsilon: float = 1e-3,
           bn_momentum: float = 0.99, dtype: str = "float32",
           conv_impl: str = "auto", head_init: str = "keras_applications") -> EfficientNet:
  """EfficientNet-B0, its arguments checked (`BadValue` names one)."""
  if name != "efficientnet_b0":
    raise BadValue("name", f"unknown EfficientNet {name!r}", "efficientnet_b0")
  if not (isinstance(num_classes, int) and num_classes >= 1):
    raise BadValue("num_classes", f"{num_classes!r}", "a positive number of classes")
  for field, value in (("dropout", dropout), ("drop_connect", drop_connect)):
    if not 0 <= value < 1:
      raise BadValue(field, f"{value}", "a rate in [0, 1)")
  if not bn_epsilon > 0 or not 0 <= bn_momentum < 1:
    raise BadValue("bn_epsilon", f"epsilon {bn_epsilon}, momentum {bn_momentum}",
                   "epsilon > 0 and momentum in [0, 1)")
  check_choices(("padding", padding, PADDINGS), ("dtype", dtype_name(dtype), DTYPES),
                ("conv_impl", conv_impl, CONV_IMPLS), ("head_init", head_init, tuple(HEAD_INITS)))
  return EfficientNet(num_classes=num_classes, dropout=dropout, drop_connect=drop_connect,
                      padding=padding, bn_epsilon=bn_epsilon, bn_momentum=bn_momentum,
                      dtype=jnp.dtype(dtype), conv_impl=conv_impl, head_init=head_init)


MODELS = {"efficientnet_b0": create}
