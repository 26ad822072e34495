import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cellrep.models import get_model
from cellrep.models.conv import Conv, conv2d, resolve_conv_impl, winograd_tile
from tests.models.helpers import WINOGRAD_DOT, random_bn_scales

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


# Winograd's own cases: every map size a ResNet at 60 px has, m = 2 and 4, odd sizes,
# uneven padding; the CASES above fall back to im2col where stride or kernel differ.
WINOGRAD_CASES = CASES + [
    (15, 3, 1, "SAME"),             # 4x4 tiles over 15: the overhang is cropped
    (8, 3, 1, "SAME"),
    (4, 3, 1, "SAME"),
    (6, 3, 1, "SAME"),              # m = 2
    (2, 3, 1, "SAME"),              # too small: im2col
    (11, 3, 1, ((2, 0), (1, 2))),
]


@pytest.mark.parametrize("impl,size,k,stride,padding",
                         [("im2col",) + c for c in CASES] + [("winograd",) + c for c in WINOGRAD_CASES])
def test_matches_xla_values_and_gradients(impl, size, k, stride, padding):
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (2, size, size, 5))
  w = jax.random.normal(kw, (k, k, 5, 7)) / k
  strides = (stride, stride)

  def loss(impl):
    return lambda x, w: jnp.sum(jnp.sin(conv2d(x, w, strides, padding, impl)))

  ref = conv2d(x, w, strides, padding, "xla")
  out = conv2d(x, w, strides, padding, impl)
  assert out.shape == ref.shape
  # float32 sums of k*k*5 products in another order (Winograd's: of transformed values).
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-5 if impl == "winograd" else 1e-5)
  grads_ref = jax.grad(loss("xla"), argnums=(0, 1))(x, w)
  grads = jax.grad(loss(impl), argnums=(0, 1))(x, w)
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


@pytest.mark.parametrize("impl", ["im2col", "winograd"])
def test_gradients_vmap_over_members(impl):
  # The hand-written gradients under the ensemble's vmap (members' kernels and inputs).
  x = jax.random.normal(jax.random.key(0), (3, 2, 9, 9, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4, 6)) / 3

  def grads(impl):
    loss = lambda x, w: jnp.sum(jnp.sin(conv2d(x, w, (1, 1), "SAME", impl)))
    return jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))(x, w)

  for g, r in zip(grads(impl), grads("xla")):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_im2col_kernel_gradient_reads_dy_in_place():
  # Autodiff's kernel gradient made XLA:CPU write dy transposed, [C_out, B*H*W], by a
  # second copy of the fusion producing dy; the written-out one reads dy as it is.
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 4, 6)) / 3
  loss = lambda w: jnp.sum(jnp.sin(conv2d(x, w, (1, 1), "SAME", "im2col")))
  text = jax.jit(jax.grad(loss)).lower(w).compile().as_text()
  assert "f32[6,128]" not in text  # dy transposed: [C_out, B*H*W]
  assert "f32[128,6]" in text or "f32[2,8,8,6]" in text


def test_conv_module_has_flax_conv_parameters():
  x = jnp.ones((1, 8, 8, 3))
  ours = Conv(4, (3, 3), (2, 2), impl="im2col").init(jax.random.key(0), x)
  flax_conv = nn.Conv(4, (3, 3), (2, 2), use_bias=False).init(jax.random.key(0), x)
  assert jax.tree.structure(ours) == jax.tree.structure(flax_conv)
  np.testing.assert_array_equal(ours["params"]["kernel"], flax_conv["params"]["kernel"])


def test_winograd_tile_by_shape():
  same = ((1, 1), (1, 1))
  assert winograd_tile((15, 15), (3, 3), (1, 1), same) == 4
  assert winograd_tile((4, 4), (3, 3), (1, 1), same) == 4
  assert winograd_tile((6, 6), (3, 3), (1, 1), same) == 2     # as many products as 2x2 tiles of 4: the smaller m
  assert winograd_tile((3, 40), (3, 3), (1, 1), same) == 0    # a 3-pixel side: im2col
  assert winograd_tile((15, 15), (3, 3), (2, 2), same) == 0
  assert winograd_tile((15, 15), (1, 1), (1, 1), ((0, 0), (0, 0))) == 0
  assert winograd_tile((15, 15), (3, 3), (1, 1), ((3, 3), (1, 1))) == 0  # its gradient needs pads <= 2


def test_resnet_impls_share_parameters_and_agree():
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 6))
  impls = ("xla", "im2col", "winograd")
  models = {impl: get_model("resnet18", 4, width=0.125, conv_impl=impl) for impl in impls}
  variables = {impl: m.init(jax.random.key(0), x) for impl, m in models.items()}
  for impl in impls[1:]:
    for a, b in zip(jax.tree.leaves(variables["xla"]), jax.tree.leaves(variables[impl])):
      np.testing.assert_array_equal(a, b)
  variables = random_bn_scales(variables["xla"])
  ref = models["xla"].apply(variables, x)
  for impl in impls[1:]:
    np.testing.assert_allclose(models[impl].apply(variables, x), ref, rtol=1e-4, atol=1e-5)


def test_auto_is_im2col_or_winograd_on_cpu_and_xla_elsewhere():
  assert resolve_conv_impl("auto", "cpu") == resolve_conv_impl("auto", "cpu", batch=32) == "im2col"
  assert resolve_conv_impl("auto", "cpu", batch=128) == "winograd"  # large batches train faster
  assert resolve_conv_impl("im2col", "cpu", batch=256) == "im2col"
  assert resolve_conv_impl("auto", "cpu", inference=True) == "winograd"
  for backend in ("gpu", "tpu"):
    assert resolve_conv_impl("auto", backend) == resolve_conv_impl("auto", backend, True) == "xla"
    assert resolve_conv_impl("auto", backend, batch=256) == "xla"
  assert resolve_conv_impl("xla", "cpu", inference=True) == "xla"
  with pytest.raises(ValueError, match="unknown conv"):
    resolve_conv_impl("fft")


def test_auto_trains_large_batches_by_winograd_on_cpu():
  w = jnp.ones((3, 3, 4, 6))

  def hlo(batch):
    x = jnp.ones((batch, 8, 8, 4))
    loss = lambda w: jnp.sum(conv2d(x, w, (1, 1), "SAME", "auto"))
    return jax.jit(jax.grad(loss)).lower(w).as_text()

  assert WINOGRAD_DOT.search(hlo(128)) and not WINOGRAD_DOT.search(hlo(32))
