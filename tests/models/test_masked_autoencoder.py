"""Microsnoop's masked residual U-Net: shapes, parameter count, patch masking, the embedding,
gradients through `MaskedReconstruction`, and argument checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cellrep import models
from cellrep.errors import BadValue
from cellrep.train.objectives import MaskedReconstruction

def _build(**kwargs):
  # XLA's convolutions, jitted: a fraction of the time of eager im2col on a small CPU.
  return models.build({"name": "masked_unet", "conv_impl": "xla", **kwargs})


def _apply(model, *args, **kwargs):
  static = ("train", "capture", "mask_ratio", "mutable")
  return jax.jit(model.apply, static_argnames=static)(*args, **kwargs)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _expected_params(widths, channels, style):
  """The count written out from Cellpose's layout: BN (scale, bias) + conv (kernel, bias)."""
  def bconv(cin, cout, k):
    return 2 * cin + k * k * cin * cout + cout

  def level(cin, cout, styled=False):  # the decoder's: 3 Denses from the embedding
    dense = 3 * (widths[-1] * cout + cout) if styled else 0
    return bconv(cin, cout, 3) + 3 * bconv(cout, cout, 3) + bconv(cin, cout, 1) + dense

  encoder = sum(level(cin, cout) for cin, cout in zip((channels,) + widths[:-1], widths))
  decoder = sum(level(cin, cout, style) for cin, cout in zip(widths[1:] + widths[-1:], widths))
  return encoder + decoder + bconv(widths[0], channels, 1)


def _init(model, x):
  return jax.jit(model.init)(jax.random.key(0), x)


def test_default_parameter_count():
  # Default (widths 32/64/128/256, style on, one channel): 6,600,453 parameters; without the
  # decoder's style Denses 6,230,373. BatchNorm running statistics are batch_stats.
  for style, count in ((True, 6_600_453), (False, 6_230_373)):
    model = models.build({"name": "masked_unet", "style": style})
    shapes = jax.eval_shape(lambda: _init(model, jnp.zeros((1, 64, 64, 1))))
    assert _count(shapes["params"]) == count == _expected_params((32, 64, 128, 256), 1, style)
  assert set(shapes["params"]) == ({f"encoder_{i}" for i in range(4)} |
                                   {f"decoder_{i}" for i in range(4)} | {"head"})


NAMES = (("masked_input", "bottleneck", "embedding", "reconstruction")
         + tuple(f"encoder_{i}" for i in range(4)) + tuple(f"decoder_{i}" for i in range(4)))


@pytest.mark.parametrize("channels,size", [(1, 32), (1, 64), (3, 32), (3, 64)])
def test_shapes_and_named_features(channels, size):
  model = _build()
  x = jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32)
  out, feats = jax.eval_shape(lambda x: model.apply(_init(model, x), x, capture=NAMES), x)
  assert set(feats) == set(NAMES)
  assert out["reconstruction"].shape == x.shape and out["reconstruction"].dtype == jnp.float32
  assert out["mask"].shape == x.shape[:3]
  for i, width in enumerate((32, 64, 128, 256)):
    assert feats[f"encoder_{i}"].shape == (2, size >> i, size >> i, width)
    assert feats[f"decoder_{i}"].shape == (2, size >> i, size >> i, width)
  assert feats["bottleneck"].shape == (2, size // 8, size // 8, 256)
  assert feats["embedding"].shape == (2, 256) and feats["embedding"].dtype == jnp.float32
  assert feats["masked_input"].shape == x.shape


def test_embedding_is_the_normalised_mean_of_the_bottleneck():
  model = _build()
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 1))
  variables = _init(model, x)
  out, feats = _apply(model, variables, x, capture=NAMES)
  assert not np.any(out["mask"])  # inference: nothing hidden
  np.testing.assert_array_equal(feats["bottleneck"], feats["encoder_3"])
  np.testing.assert_array_equal(feats["reconstruction"], out["reconstruction"])
  np.testing.assert_array_equal(feats["masked_input"], x)
  emb = feats["embedding"]
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
  pooled = np.asarray(feats["bottleneck"]).mean(axis=(1, 2))
  np.testing.assert_allclose(emb, pooled / np.linalg.norm(pooled, axis=-1, keepdims=True),
                             rtol=1e-4, atol=1e-6)
  with pytest.raises(BadValue, match="block6a_activation.*encoder_0"):
    jax.eval_shape(lambda v: model.apply(v, x, capture=("block6a_activation",)), variables)


def test_masks_hide_a_quarter_of_16px_patches_afresh_per_sample_and_key():
  model = _build(widths=(4, 8))  # masking comes before the network: any depth shows it
  x = jax.random.uniform(jax.random.key(1), (6, 64, 64, 1), minval=0.5, maxval=1.5)
  variables = _init(model, x)

  def masked(key):
    (out, feats), _ = _apply(model, variables, x, train=True, capture=("masked_input",),
                                  rngs={"mask": key}, mutable=("batch_stats",))
    return np.asarray(out["mask"]), np.asarray(feats["masked_input"])

  mask, seen = masked(jax.random.key(2))
  # Whole 16 px patches, 4 of each image's 16 (round(0.25 x 16)).
  patches = mask.reshape(6, 4, 16, 4, 16)
  assert np.all(patches.min(axis=(2, 4)) == patches.max(axis=(2, 4)))
  np.testing.assert_array_equal(mask.mean(axis=(1, 2)), 0.25)
  # Hidden pixels are zero in what the network sees; the others are the input.
  np.testing.assert_array_equal(seen[mask == 1], 0)
  np.testing.assert_array_equal(seen[mask == 0], np.asarray(x)[mask == 0])
  # A fresh mask per sample and per key; the same key, the same mask.
  assert len({m.tobytes() for m in mask}) == 6
  assert not np.array_equal(mask, masked(jax.random.key(3))[0])
  np.testing.assert_array_equal(mask, masked(jax.random.key(2))[0])
  # A ratio given at the call masks at inference too; train=True with ratio 0 does not.
  out = _apply(model, variables, x, mask_ratio=0.5, rngs={"mask": jax.random.key(4)})
  np.testing.assert_array_equal(out["mask"].mean(axis=(1, 2)), 0.5)
  out, _ = _apply(model, variables, x, train=True, mask_ratio=0.0, mutable=("batch_stats",))
  assert not np.any(out["mask"])


def test_gradient_flows_to_every_parameter_through_masked_reconstruction():
  model = _build(widths=(4, 8))  # every kind of layer: pool, upsample, skip, style, head
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 2))
  variables = _init(model, x)
  objective = MaskedReconstruction()

  def loss(params):
    out, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                               train=True, rngs={"mask": jax.random.key(5)},
                               mutable=["batch_stats"])
    return objective.loss(out, {"images": x})[0], updates

  (value, updates), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  assert np.isfinite(value) and value > 0
  flat = jax.tree_util.tree_leaves_with_path(grads)
  dead = [jax.tree_util.keystr(p) for p, g in flat if not np.any(np.asarray(g))]
  assert not dead and all(np.all(np.isfinite(g)) for _, g in flat)
  before, after = jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(updates["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))
  predicted = jax.eval_shape(lambda v: objective.predict(model.apply(v, x)), variables)
  assert predicted.shape == x.shape


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  model = _build(widths=(4, 8), dtype="bfloat16")
  x = jnp.ones((2, 16, 16, 1))
  variables = _init(model, x)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  out, feats = _apply(model, variables, x, capture=("embedding", "bottleneck"))
  assert out["reconstruction"].dtype == feats["embedding"].dtype == jnp.float32
  assert feats["bottleneck"].dtype == jnp.bfloat16 and feats["embedding"].shape == (2, 8)


def test_image_sizes_the_network_cannot_take_are_refused():
  model = _build(widths=(4, 8, 16))
  with pytest.raises(BadValue) as e:
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 30, 32, 1)))
  assert e.value.field == "images"
  x = jnp.zeros((1, 24, 24, 1))  # 24 px: 2 pools fit, 16 px patches do not
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  with pytest.raises(BadValue) as e:
    jax.eval_shape(lambda v: model.apply(v, x, mask_ratio=0.25, rngs={"mask": jax.random.key(0)}),
                   variables)
  assert e.value.field == "mask_patch"


@pytest.mark.parametrize("kwargs,field", [
    ({"name": "masked_vit"}, "name"), ({"widths": ()}, "widths"), ({"widths": (32, 0)}, "widths"),
    ({"widths": 32}, "widths"), ({"style": "yes"}, "style"), ({"mask_patch": 0}, "mask_patch"),
    ({"mask_ratio": 1.5}, "mask_ratio"), ({"bn_momentum": 1.0}, "bn_momentum"),
    ({"bn_epsilon": 0}, "bn_epsilon"), ({"dtype": "float16"}, "dtype"),
    ({"conv_impl": "fft"}, "conv_impl"), ({"num_classes": 3}, "num_classes")])
def test_the_model_checks_its_own_arguments(kwargs, field):
  with pytest.raises(BadValue) as e:
    models.build({"name": "masked_unet", **kwargs})
  assert e.value.field == field


def test_registered_by_name():
  assert "masked_unet" in models.names()
  model = models.build({"name": "masked_unet", "widths": [16, 32]})
  assert model.widths == (16, 32) and model.mask_ratio == 0.25 and model.mask_patch == 16
