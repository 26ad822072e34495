import re

import jax

# Winograd F(4x4, 3x3) in lowered StableHLO: one product per tile position, a dot batched over 36.
WINOGRAD_DOT = re.compile(r"batching_dims = \[0\] x \[0\][^\n]*: \(tensor<36x")


def random_bn_scales(variables):
  """`variables` with every BatchNorm scale drawn from U(0.5, 1): the zero-initialised
  scales of each block's last BN would hide that block's last convolution."""
  def draw(path, leaf):
    if path[-1].key != "scale":
      return leaf
    return jax.random.uniform(jax.random.key(len(path) + leaf.size), leaf.shape, minval=0.5)
  return jax.tree_util.tree_map_with_path(draw, variables)
