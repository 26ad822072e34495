"""ResNet-18/34/50 (He et al. 2016; torchvision's v1.5 layout) in Flax linen.

CellSighter's classifier is torchvision's ``resnet50`` with ``conv1`` taking the
K marker channels plus two mask channels; any number of input channels works
here because Flax infers the input width at ``init``.

Options beyond the standard network:
- ``width``: multiplier of every stage's channel count (64 * width, ...), for
  tiny test and demo models;
- ``stem="small"``: a 3x3 stride-1 stem without max-pooling for crops of a few
  dozen pixels, where the ImageNet stem (7x7 stride 2 + max-pool) would leave
  the last stage with a 1x1 map.
- ``dtype``: computation dtype (bfloat16 on accelerators); parameters and
  batch statistics stay float32.
- ``conv_impl``: how convolutions reach XLA (`cellrep.ops.conv`), as the run's policy
  sets it (`cellrep.ops.policy`): ``auto`` (the backend's choice), ``xla``, ``im2col``
  or ``winograd``. Parameters are the same under each. The stem's max-pool follows it
  (`cellrep.ops.pool`: reduce_window for ``xla``, strided views otherwise).

Named features (``capture=``): ``stem`` (after the stem, and its max-pool), ``layer<i>_<j>``
(block j of stage i, from 1 and 0), ``layer<i>`` (stage i's output), ``pool`` (the
spatial mean of the last stage, float32: CellSighter's penultimate features) and
``logits``.

Layout is NHWC: images [batch, height, width, channels].
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cellrep.errors import BadValue
from cellrep.models.layers import Conv, Taps, check_choices
from cellrep.ops.policy import CONV_IMPLS, DTYPES, dtype_name
from cellrep.ops.pool import max_pool

ModuleDef = Any

STAGES = {
    "resnet18": ((2, 2, 2, 2), "basic"),
    "resnet34": ((3, 4, 6, 3), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"),
}
STEMS = ("imagenet", "small")


class BasicBlock(nn.Module):
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides))(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    # Zero-init the last BN scale so each block starts as the identity (Goyal et al.).
    y = self.norm(scale_init=nn.initializers.zeros)(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), (self.strides, self.strides), name="downsample_conv")(x)
      residual = self.norm(name="downsample_bn")(residual)
    return nn.relu(residual + y)


class Bottleneck(nn.Module):
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  expansion: int = 4

  @nn.compact
  def __call__(self, x):
    residual = x
    y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
    # torchvision v1.5: the stride sits on the 3x3 convolution.
    y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), (self.strides, self.strides))(y)))
    y = self.conv(self.filters * self.expansion, (1, 1))(y)
    y = self.norm(scale_init=nn.initializers.zeros)(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters * self.expansion, (1, 1), (self.strides, self.strides),
                           name="downsample_conv")(x)
      residual = self.norm(name="downsample_bn")(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """ResNet classifier. `__call__(x [B, H, W, C], train, capture) -> logits [B, num_classes]`
  (with `capture`: (logits, {name: feature}))."""
  stage_sizes: Sequence[int]
  block: str
  num_classes: int
  width: float = 1.0
  stem: str = "imagenet"
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False, capture: Sequence[str] = ()):
    taps = Taps(capture)
    conv = functools.partial(Conv, use_bias=False, dtype=self.dtype, impl=self.conv_impl,
                             kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype)
    block_cls: Callable = BasicBlock if self.block == "basic" else Bottleneck
    base = max(1, int(round(64 * self.width)))
    x = x.astype(self.dtype)
    if self.stem == "imagenet":
      x = conv(base, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv1")(x)
      x = nn.relu(norm(name="bn1")(x))
      x = max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)), impl=self.conv_impl)
    elif self.stem == "small":
      x = conv(base, (3, 3), name="conv1")(x)
      x = nn.relu(norm(name="bn1")(x))
    else:
      raise BadValue("stem", f"unknown stem {self.stem!r}", f"one of {list(STEMS)}")
    taps("stem", x)
    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = taps(f"layer{i + 1}_{j}", block_cls(base * 2**i, conv=conv, norm=norm,
                                                strides=strides, name=f"layer{i + 1}_{j}")(x))
      taps(f"layer{i + 1}", x)
    features = taps("pool", jnp.mean(x, axis=(1, 2)).astype(jnp.float32))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(features.astype(self.dtype))
    return taps.result(taps("logits", logits.astype(jnp.float32)))


def create(name: str = "resnet50", *, num_classes: int, width: float = 1.0,
           stem: str = "imagenet", dtype: str = "float32", conv_impl: str = "auto") -> ResNet:
  """The ResNet called `name` (one of `STAGES`), its arguments checked (`BadValue` names one)."""
  if name not in STAGES:
    raise BadValue("name", f"unknown ResNet {name!r}", f"one of {sorted(STAGES)}")
  if not (isinstance(num_classes, int) and num_classes >= 1):
    raise BadValue("num_classes", f"{num_classes!r}", "a positive number of classes")
  if not width > 0:
    raise BadValue("width", f"{width}", "a positive multiplier")
  check_choices(("stem", stem, STEMS), ("dtype", dtype_name(dtype), DTYPES),
                ("conv_impl", conv_impl, CONV_IMPLS))
  stages, block = STAGES[name]
  return ResNet(stage_sizes=stages, block=block, num_classes=num_classes, width=width,
                stem=stem, dtype=jnp.dtype(dtype), conv_impl=conv_impl)


MODELS = {name: create for name in STAGES}
