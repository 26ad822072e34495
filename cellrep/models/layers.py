"""Building blocks every model shares: the convolution, and named features on request.

`Conv` has the parameters of `flax.linen.Conv` (``kernel`` [kh, kw, C_in / groups,
C_out], ``bias`` [C_out] when `use_bias`; same names, shapes and initialisers), so a
model gives the same numbers whichever implementation runs it and checkpoints move
between them. Its `impl` is chosen by the run's policy (`cellrep.ops.policy`); the
kernels are `cellrep.ops.conv`.

`Taps` collects the intermediate features a caller asked for by name
(``capture=("layer4", "pool")``): a model calls ``taps(name, x)`` at each named point
and returns ``taps.result(output)``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cellrep.errors import BadValue
from cellrep.ops.conv import Padding, conv2d


class Conv(nn.Module):
  """`flax.linen.Conv` for NHWC images with a selectable implementation (`cellrep.ops.conv`).

  impl: ``auto`` (the backend's choice for this batch and dtype), ``xla``, ``im2col`` or
  ``winograd``. dtype: the computation dtype (None: the input's, promoted to float32 at
  least); parameters are float32.
  """
  features: int
  kernel_size: Sequence[int]
  strides: int | Sequence[int] = 1
  padding: Padding = "SAME"
  feature_group_count: int = 1
  use_bias: bool = True
  dtype: Any = None
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C_in] -> [B, H', W', features] in `dtype`."""
    dtype = self.dtype if self.dtype is not None else jnp.promote_types(x.dtype, jnp.float32)
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
    groups = self.feature_group_count
    if x.shape[-1] % groups or self.features % groups:
      raise BadValue("feature_group_count", f"{groups} does not divide {x.shape[-1]} input and "
                     f"{self.features} output channels", "a common divisor")
    kernel = self.param("kernel", self.kernel_init,
                        tuple(self.kernel_size) + (x.shape[-1] // groups, self.features),
                        jnp.float32)
    y = conv2d(x.astype(dtype), kernel.astype(dtype), strides, self.padding, self.impl,
               feature_group_count=groups)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(dtype)
    return y


def check_choices(*fields: tuple[str, Any, Sequence]) -> None:
  """Raises `BadValue` naming the first (field, value, choices) whose value is not a choice."""
  for field, value, choices in fields:
    if value not in choices:
      raise BadValue(field, f"{value!r} is not a known choice", f"one of {list(choices)}")


class Taps:
  """The named features a model was asked for (`capture`), gathered as it runs.

  ``taps(name, x)`` keeps x when `name` was asked for and returns x; `result(output)` is
  `output` when nothing was asked for, else ``(output, {name: feature})``, after checking
  that every name asked for exists (`BadValue` naming the known ones otherwise).
  """

  def __init__(self, capture: Sequence[str] = ()):
    if isinstance(capture, str):
      capture = (capture,)
    self.wanted = tuple(capture)
    self.seen: list[str] = []
    self.features: dict[str, jax.Array] = {}

  def __call__(self, name: str, x):
    self.seen.append(name)
    if name in self.wanted:
      self.features[name] = x
    return x

  def result(self, output):
    if not self.wanted:
      return output
    missing = [n for n in self.wanted if n not in self.features]
    if missing:
      raise BadValue("capture", f"no layer named {missing[0]!r}", f"one of {self.seen}")
    return output, {n: self.features[n] for n in self.wanted}
