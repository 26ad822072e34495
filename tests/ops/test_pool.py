import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cellrep.ops.pool import max_pool

# (input [B, H, W, C], window, strides, padding): the ResNet stem's pool and odd ones.
CASES = [
    ((2, 30, 30, 5), (3, 3), (2, 2), ((1, 1), (1, 1))),
    ((3, 9, 8, 2), (3, 2), (2, 3), ((0, 2), (1, 0))),
    ((1, 7, 7, 3), (2, 2), (1, 1), ((0, 0), (0, 0))),
]


@pytest.mark.parametrize("shape,window,strides,padding", CASES)
def test_views_match_reduce_window_values_and_gradients(shape, window, strides, padding):
  x = jax.random.normal(jax.random.key(0), shape)
  ref = nn.max_pool(x, window, strides=strides, padding=padding)
  ct = jax.random.normal(jax.random.key(1), ref.shape)

  def loss(impl):
    return lambda x: jnp.sum(max_pool(x, window, strides, padding, impl) * ct)

  np.testing.assert_array_equal(max_pool(x, window, strides, padding, "im2col"), ref)
  np.testing.assert_array_equal(max_pool(x, window, strides, padding, "xla"), ref)
  # Overlapping windows sum their shares in another order.
  np.testing.assert_allclose(jax.grad(loss("im2col"))(x), jax.grad(loss("xla"))(x),
                             rtol=1e-6, atol=1e-6)


def test_ties_go_to_the_first_pixel_in_window_order_as_reduce_window():
  x = jnp.zeros((1, 4, 4, 1))
  grad = lambda impl: jax.grad(
      lambda x: jnp.sum(max_pool(x, (2, 2), (2, 2), ((0, 0), (0, 0)), impl)))(x)
  expected = np.zeros((4, 4))
  expected[::2, ::2] = 1
  np.testing.assert_array_equal(grad("im2col")[0, :, :, 0], expected)
  np.testing.assert_array_equal(grad("xla")[0, :, :, 0], expected)


def test_gradients_vmap_over_members():
  x = jax.random.normal(jax.random.key(0), (3, 2, 9, 9, 4))
  loss = lambda impl: lambda x: jnp.sum(jnp.sin(max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)), impl)))
  grads = {impl: jax.jit(jax.vmap(jax.grad(loss(impl))))(x) for impl in ("im2col", "xla")}
  np.testing.assert_allclose(grads["im2col"], grads["xla"], rtol=1e-6, atol=1e-6)


def test_views_gradient_has_no_gather_or_scatter():
  x = jnp.ones((2, 30, 30, 4))
  loss = lambda x: jnp.sum(max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)), "im2col"))
  text = jax.jit(jax.grad(loss)).lower(x).as_text()
  assert "gather" not in text and "scatter" not in text and "reduce_window" not in text
