import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cellrep import models
from cellrep.models.layers import Conv
from cellrep.ops import conv
from cellrep.ops.conv import conv2d, winograd_tile
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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernel_gradients_vmap_over_members_of_one_shared_input(dtype):
  # Images no member augments differently: the members share the stem's im2col columns,
  # so their kernel gradients are one product of the shared columns with every member's dy
  # (float32 cotangents, as BatchNorm's backward gives them). In bfloat16, vmap's own form
  # of that product failed on XLA:CPU: "BF16 x BF16 = F32".
  cols = jax.random.normal(jax.random.key(0), (2, 16, 16, 45)).astype(dtype)
  w = jax.random.normal(jax.random.key(1), (45, 32)) / 7
  dy = jax.random.normal(jax.random.key(2), (3, 2, 16, 16, 32))

  def kernel_grad(cols, w, dy):
    return jax.vjp(lambda w: conv._cols_product(cols, w.astype(dtype)), w)[1](dy)[0]

  expected = jnp.einsum("bhwk,mbhwo->mko", cols.astype(jnp.float32),
                        dy.astype(dtype).astype(jnp.float32))
  tol = 1e-4 if dtype == "float32" else 1e-2
  grads = jax.jit(jax.vmap(kernel_grad, in_axes=(None, None, 0)))(cols, w, dy)
  np.testing.assert_allclose(grads, expected, rtol=tol, atol=tol)


def test_im2col_kernel_gradient_reads_dy_in_place():
  # Autodiff's kernel gradient made XLA:CPU write dy transposed, [C_out, B*H*W], by a
  # second copy of the fusion producing dy; the written-out one reads dy as it is.
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 4, 6)) / 3
  loss = lambda w: jnp.sum(jnp.sin(conv2d(x, w, (1, 1), "SAME", "im2col")))
  text = jax.jit(jax.grad(loss)).lower(w).compile().as_text()
  assert "f32[6,128]" not in text  # dy transposed: [C_out, B*H*W]
  assert "f32[128,6]" in text or "f32[2,8,8,6]" in text


@pytest.mark.parametrize("use_bias,groups", [(False, 1), (True, 1), (True, 3)])
def test_conv_module_has_flax_conv_parameters(use_bias, groups):
  x = jnp.ones((1, 8, 8, 6))
  kw = dict(use_bias=use_bias, feature_group_count=groups)
  ours = Conv(9, (3, 3), (2, 2), impl="im2col", **kw).init(jax.random.key(0), x)
  flax_conv = nn.Conv(9, (3, 3), (2, 2), **kw).init(jax.random.key(0), x)
  assert jax.tree.structure(ours) == jax.tree.structure(flax_conv)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(flax_conv)):
    np.testing.assert_array_equal(a, b)


# Grouped and depthwise convolutions, as EfficientNet and ResNeXt have them:
# (input HxW, C_in, C_out, groups, kernel, strides, padding).
GROUPED = [
    (12, 6, 6, 6, 3, 1, "SAME"),     # depthwise 3x3
    (12, 6, 6, 6, 3, 2, "SAME"),     # depthwise 3x3 / 2
    (15, 4, 4, 4, 5, 1, "SAME"),     # depthwise 5x5
    (15, 4, 4, 4, 5, 2, "SAME"),     # depthwise 5x5 / 2, odd input
    (10, 4, 8, 4, 3, 1, "SAME"),     # depthwise with channel multiplier 2
    (11, 6, 9, 3, 3, 2, "SAME"),     # 3 groups of 2 -> 3
    (9, 8, 8, 2, 1, 1, "VALID"),     # grouped 1x1
]


@pytest.mark.parametrize("impl", ["xla", "im2col", "winograd", "auto"])
@pytest.mark.parametrize("size,cin,cout,groups,k,stride,padding", GROUPED)
def test_grouped_convolutions_match_flax_values_and_gradients(impl, size, cin, cout, groups, k,
                                                              stride, padding):
  x = jax.random.normal(jax.random.key(0), (2, size, size, cin))
  kwargs = dict(features=cout, kernel_size=(k, k), strides=(stride, stride), padding=padding,
                feature_group_count=groups)
  ref_module, module = nn.Conv(**kwargs), Conv(impl=impl, **kwargs)
  variables = ref_module.init(jax.random.key(1), x)
  variables = jax.tree.map(lambda v: v + 0.1, variables)  # a non-zero bias too
  ct = jax.random.normal(jax.random.key(2), ref_module.apply(variables, x).shape)

  def loss(m):
    return lambda v, x: jnp.sum(m.apply(v, x) * ct)

  np.testing.assert_allclose(module.apply(variables, x), ref_module.apply(variables, x),
                             rtol=1e-5, atol=1e-5)
  grads = jax.grad(loss(module), argnums=(0, 1))(variables, x)
  grads_ref = jax.grad(loss(ref_module), argnums=(0, 1))(variables, x)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_depthwise_im2col_is_elementwise_and_vmaps_over_members():
  # No product with one input channel per group: sums of views times taps.
  x = jax.random.normal(jax.random.key(0), (3, 2, 9, 9, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 3, 1, 4))
  conv = lambda impl: jax.vmap(lambda x, w: conv2d(x, w, (1, 1), "SAME", impl, 4))
  text = jax.jit(conv("im2col")).lower(x, w).as_text()
  assert "convolution" not in text and "dot_general" not in text
  np.testing.assert_allclose(conv("im2col")(x, w), conv("xla")(x, w), rtol=1e-5, atol=1e-5)


# Depthwise convolutions whose kernel gradient is written out (conv._depthwise_kernel_grad):
# (input HxW, kernel, strides, padding, channel multiplier).
DEPTHWISE_CASES = [
    (19, 3, 1, "SAME", 1),
    (19, 5, 2, "SAME", 1),             # odd input, TensorFlow's padding (more after)
    (20, 3, 2, ((1, 1), (1, 1)), 1),   # torchvision's symmetric padding
    (2, 5, 1, "SAME", 1),              # taps that read only padding
    (11, 3, 1, ((2, 0), (0, 2)), 2),   # uneven padding, channel multiplier 2
]


@pytest.mark.parametrize("rows,chunk_bytes", [(3, 1), (16, 1 << 40)])
@pytest.mark.parametrize("size,k,stride,padding,multiplier", DEPTHWISE_CASES)
def test_depthwise_gradients_by_rows_and_batch_chunks_match_xla(monkeypatch, rows, chunk_bytes,
                                                                size, k, stride, padding,
                                                                multiplier):
  # A few output rows per fusion and one image per chunk (a scan over the batch), or the
  # whole map and batch at once: the same gradients as XLA's, alone and vmapped over members.
  monkeypatch.setattr(conv, "DEPTHWISE_ROWS", rows)
  monkeypatch.setattr(conv, "DEPTHWISE_CHUNK_BYTES", chunk_bytes)
  x = jax.random.normal(jax.random.key(0), (2, 4, size, size, 6))
  w = jax.random.normal(jax.random.key(1), (2, k, k, 1, 6 * multiplier)) / k
  strides = (stride, stride)

  def grads(impl):
    loss = lambda x, w: jnp.sum(jnp.sin(conv2d(x, w, strides, padding, impl, 6)))
    return jax.grad(loss, argnums=(0, 1))

  np.testing.assert_allclose(conv2d(x[0], w[0], strides, padding, "im2col", 6),
                             conv2d(x[0], w[0], strides, padding, "xla", 6), rtol=1e-5, atol=1e-5)
  for g, r in zip(grads("im2col")(x[0], w[0]), grads("xla")(x[0], w[0])):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
  for g, r in zip(jax.vmap(grads("im2col"))(x, w), jax.vmap(grads("xla"))(x, w)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_bfloat16_depthwise_accumulates_in_float32():
  x = jax.random.normal(jax.random.key(0), (2, 12, 12, 8))
  w = jax.random.normal(jax.random.key(1), (5, 5, 1, 8)) / 5
  ref = conv2d(x, w, (2, 2), "SAME", "xla", 8)
  out = conv2d(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (2, 2), "SAME", "im2col", 8)
  assert out.dtype == jnp.bfloat16
  err = jnp.sqrt(jnp.mean((out.astype(jnp.float32) - ref) ** 2) / jnp.mean(ref ** 2))
  assert float(err) < 0.01


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
  nets = {impl: models.build({"name": "resnet18"}, num_classes=4, width=0.125, conv_impl=impl)
          for impl in impls}
  variables = {impl: m.init(jax.random.key(0), x) for impl, m in nets.items()}
  for impl in impls[1:]:
    for a, b in zip(jax.tree.leaves(variables["xla"]), jax.tree.leaves(variables[impl])):
      np.testing.assert_array_equal(a, b)
  variables = random_bn_scales(variables["xla"])
  ref = nets["xla"].apply(variables, x)
  for impl in impls[1:]:
    np.testing.assert_allclose(nets[impl].apply(variables, x), ref, rtol=1e-4, atol=1e-5)


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


@pytest.mark.parametrize("impl", ["im2col", "winograd"])
def test_hand_written_gradients_of_an_input_shared_by_sharded_members(impl):
  # Members sharded over devices (the map strategy's shard_map), images they share: the
  # shared input's cotangent is the sum over members, typed like the input.
  from jax.sharding import AxisType, PartitionSpec as P
  mesh = jax.make_mesh((2,), ("member",), axis_types=(AxisType.Auto,), devices=jax.devices()[:2])
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 4))
  w = jax.random.normal(jax.random.key(1), (2, 3, 3, 4, 6)) / 3

  def grads(impl):
    def local(x, w):
      loss = lambda x, w: jax.lax.psum(jnp.sum(jnp.sin(jax.vmap(
          lambda w: conv2d(x, w, (1, 1), "SAME", impl))(w))), "member")
      return jax.grad(loss, argnums=(0, 1))(x, w)
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("member")),
                                 out_specs=(P(), P("member"))))(x, w)

  for g, r in zip(grads(impl), grads("xla")):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
