"""Models: Flax modules used through pure `init`/`apply`, built by name."""

from __future__ import annotations

import jax.numpy as jnp

from cellrep.models import resnet
from cellrep.models.conv import IMPLS as CONV_IMPLS

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_BUILDERS = {name: resnet.resnet for name in resnet.STAGES}

NAMES = tuple(sorted(_BUILDERS))
DTYPES = tuple(_DTYPES)


def get_model(name: str, num_classes: int, *, width: float = 1.0, stem: str = "imagenet",
              dtype: str = "float32", conv_impl: str = "auto"):
  """The Flax module called `name` (one of NAMES) with `num_classes` outputs.

  conv_impl: one of CONV_IMPLS (`cellrep.models.conv`); parameters do not depend on it.
  """
  if name not in _BUILDERS:
    raise ValueError(f"unknown model {name!r}; known: {list(NAMES)}")
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"unknown conv_impl {conv_impl!r}; known: {list(CONV_IMPLS)}")
  return _BUILDERS[name](name, num_classes, width=width, stem=stem, dtype=_DTYPES[dtype],
                         conv_impl=conv_impl)
