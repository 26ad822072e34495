import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cellrep.models import get_model
from cellrep.models import conv as conv_lib
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
  # bfloat16: im2col on a CPU (Winograd's rounded transforms lose accuracy), XLA elsewhere.
  assert resolve_conv_impl("auto", "cpu", True, dtype=jnp.bfloat16) == "im2col"
  assert resolve_conv_impl("auto", "cpu", batch=256, dtype="bfloat16") == "im2col"
  assert resolve_conv_impl("auto", "gpu", True, dtype=jnp.bfloat16) == "xla"
  assert resolve_conv_impl("winograd", "cpu", True, dtype=jnp.bfloat16) == "winograd"
  with pytest.raises(ValueError, match="unknown conv"):
    resolve_conv_impl("fft")


def test_auto_trains_large_batches_by_winograd_on_cpu():
  w = jnp.ones((3, 3, 4, 6))

  def hlo(batch):
    x = jnp.ones((batch, 8, 8, 4))
    loss = lambda w: jnp.sum(conv2d(x, w, (1, 1), "SAME", "auto"))
    return jax.jit(jax.grad(loss)).lower(w).as_text()

  assert WINOGRAD_DOT.search(hlo(128)) and not WINOGRAD_DOT.search(hlo(32))


# A dot_general in lowered StableHLO with bfloat16 operands and its result type.
BF16_DOT = re.compile(r"stablehlo\.dot_general[^\n]*: \(tensor<[^>]*xbf16>, tensor<[^>]*xbf16>\)"
                      r" -> tensor<[^>]*x(\w+)>")


# Relative RMS error bounds of bfloat16 operands against float32 (measured: im2col 0.29%,
# Winograd F(4x4, 3x3) 2.3%, F(2x2, 3x3) 0.5%: its transformed operands are rounded too).
@pytest.mark.parametrize("impl,size,k,stride,padding,tol",
                         [("im2col", 12, 3, 2, "SAME", 0.005),
                          ("im2col", 20, 7, 2, ((3, 3), (3, 3)), 0.005),
                          ("winograd", 15, 3, 1, "SAME", 0.035),
                          ("winograd", 6, 3, 1, "SAME", 0.008)])
def test_bfloat16_products_accumulate_in_float32(impl, size, k, stride, padding, tol):
  kx, kw = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (2, size, size, 16))
  w = jax.random.normal(kw, (k, k, 16, 8)) / (k * 4)
  strides = (stride, stride)
  ref = conv2d(x, w, strides, padding, "xla")
  low = jax.jit(lambda x, w: conv2d(x, w, strides, padding, impl))
  x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  out = low(x16, w16)
  assert out.dtype == jnp.bfloat16
  # Operands rounded to 8 bits of mantissa, sums in float32.
  err = jnp.sqrt(jnp.mean((out.astype(jnp.float32) - ref) ** 2) / jnp.mean(ref ** 2))
  assert float(err) < tol
  # Every product takes bfloat16 operands to a float32 result (the form XLA:CPU runs natively).
  text = low.lower(x16, w16).as_text()
  results = BF16_DOT.findall(text)
  assert results and set(results) == {"f32"}
  assert ("batching_dims = [0] x [0]" in text) == (impl == "winograd")  # tile positions
  grads = jax.grad(lambda x, w: jnp.sum(conv2d(x, w, strides, padding, impl).astype(jnp.float32)
                                        ** 2), argnums=(0, 1))(x16, w16)
  grads_ref = jax.grad(lambda x, w: jnp.sum(conv2d(x, w, strides, padding, "xla") ** 2),
                       argnums=(0, 1))(x, w)
  for g, r, primal in zip(grads, grads_ref, (x16, w16)):
    assert g.dtype == primal.dtype
    gerr = jnp.sqrt(jnp.mean((g.astype(jnp.float32) - r) ** 2) / jnp.mean(r ** 2))
    assert float(gerr) < 2 * tol


def test_bfloat16_im2col_copies_bits_exactly():
  # The views are concatenated as 16-bit patterns: the product of patches with a one-hot kernel
  # returns each pixel exactly (a bfloat16 times 1, summed with zeros, in float32).
  x = jax.random.normal(jax.random.key(2), (1, 5, 5, 3)).astype(jnp.bfloat16)
  w = jnp.zeros((3, 3, 3, 3), jnp.bfloat16).at[1, 1].set(jnp.eye(3, dtype=jnp.bfloat16))
  out = conv2d(x, w, (1, 1), "SAME", "im2col")
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(x, np.float32))


def test_fast_bfloat16_by_backend_and_cpu_flags(monkeypatch):
  assert conv_lib.fast_bfloat16("gpu") and conv_lib.fast_bfloat16("tpu")
  monkeypatch.setattr(conv_lib, "_cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
  assert not conv_lib.fast_bfloat16("cpu")
  monkeypatch.setattr(conv_lib, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
  assert conv_lib.fast_bfloat16("cpu")
