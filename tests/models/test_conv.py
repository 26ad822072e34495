import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cellrep.models import get_model
from cellrep.models.conv import Conv, conv2d, resolve_conv_impl

# (input HxW, kernel, strides, padding): every convolution a ResNet has, plus odd sizes.
CASES = [
    (12, 3, 1, "SAME"),
    (12, 3, 2, "SAME"),
    (15, 3, 2, "SAME"),             # odd input, asymmetric SAME padding
    (15, 1, 2, "SAME"),             # strided 1x1 (downsample): a slice, no copy
    (16, 1, 1, "VALID"),
    (20, 7, 2, ((3, 3), (3, 3))),   # ImageNet stem
    (9, 3, 1, "VALID"),
]


@pytest.mark.parametrize("size,k,stride,padding", CASES)
def test_im2col_matches_xla_values_and_gradients(size, k, stride, padding):
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (2, size, size, 5))
  w = jax.random.normal(kw, (k, k, 5, 7)) / k
  strides = (stride, stride)

  def loss(impl):
    return lambda x, w: jnp.sum(jnp.sin(conv2d(x, w, strides, padding, impl)))

  ref = conv2d(x, w, strides, padding, "xla")
  out = conv2d(x, w, strides, padding, "im2col")
  assert out.shape == ref.shape
  # float32 sums of k*k*5 products in another order.
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  grads_ref = jax.grad(loss("xla"), argnums=(0, 1))(x, w)
  grads = jax.grad(loss("im2col"), argnums=(0, 1))(x, w)
  for g, r in zip(grads, grads_ref):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_vmap_over_members_gives_batched_products_not_grouped_convolutions():
  # The point of im2col: members' convolutions become one batched dot, where a vmapped
  # convolution becomes a grouped convolution (slow on XLA:CPU).
  x = jnp.ones((3, 2, 8, 8, 4))
  w = jnp.ones((3, 3, 3, 4, 6))

  def hlo(impl):
    f = jax.vmap(lambda x, w: conv2d(x, w, (1, 1), "SAME", impl))
    return jax.jit(f).lower(x, w).as_text()

  assert "feature_group_count = 3" in hlo("xla")
  text = hlo("im2col")
  assert "convolution" not in text and "dot_general" in text


def test_conv_module_has_flax_conv_parameters():
  x = jnp.ones((1, 8, 8, 3))
  ours = Conv(4, (3, 3), (2, 2), impl="im2col").init(jax.random.key(0), x)
  flax_conv = nn.Conv(4, (3, 3), (2, 2), use_bias=False).init(jax.random.key(0), x)
  assert jax.tree.structure(ours) == jax.tree.structure(flax_conv)
  np.testing.assert_array_equal(ours["params"]["kernel"], flax_conv["params"]["kernel"])


def test_resnet_impls_share_parameters_and_agree():
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 6))
  models = {impl: get_model("resnet18", 4, width=0.125, conv_impl=impl) for impl in ("xla", "im2col")}
  variables = {impl: m.init(jax.random.key(0), x) for impl, m in models.items()}
  for a, b in zip(jax.tree.leaves(variables["xla"]), jax.tree.leaves(variables["im2col"])):
    np.testing.assert_array_equal(a, b)
  ref = models["xla"].apply(variables["xla"], x)
  np.testing.assert_allclose(models["im2col"].apply(variables["xla"], x), ref, rtol=1e-4, atol=1e-5)


def test_auto_is_im2col_on_cpu_and_xla_elsewhere():
  assert resolve_conv_impl("auto", "cpu") == "im2col"
  assert resolve_conv_impl("auto", "gpu") == resolve_conv_impl("auto", "tpu") == "xla"
  assert resolve_conv_impl("xla", "cpu") == "xla"
  with pytest.raises(ValueError, match="unknown conv"):
    resolve_conv_impl("winograd")
