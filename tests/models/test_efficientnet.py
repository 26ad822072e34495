"""EfficientNet-B0: the published shape and parameter count, and weights from Keras and
torchvision giving the reference network's numbers.

The equivalence tests build the reference model with random weights (BatchNorm
statistics and affine parameters randomised too, so that every imported tensor
matters), import them, and compare logits and ``block6a_activation`` in inference mode:
within 1e-4 of the reference's largest magnitude (float32, XLA convolutions).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cellrep import models
from cellrep.errors import BadValue, InputError
from cellrep.models import import_weights

TOL = 1e-4
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:keras"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:keras")]


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _close(ours, theirs, what):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, what
  scale = np.abs(theirs).max()
  assert scale > 0, what
  err = np.abs(ours - theirs).max() / scale
  assert err < TOL, f"{what}: max error {err:.2e} of the largest magnitude {scale:.3g}"


def test_b0_parameter_count_and_block6a_shape():
  model = models.build({"name": "efficientnet_b0"}, num_classes=1000)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  # torchvision's efficientnet_b0(): 5,288,548 parameters; Keras counts 5,330,571 in all,
  # BatchNorm's moving statistics (42,016) and its input normalisation (7) besides.
  assert _count(shapes["params"]) == 5_288_548
  assert _count(shapes["batch_stats"]) == 42_016
  five = models.build({"name": "efficientnet_b0"}, num_classes=12)
  x = jnp.zeros((2, 128, 128, 5))
  variables = jax.eval_shape(lambda: five.init(jax.random.key(0), x))
  (logits, feats) = jax.eval_shape(lambda v: five.apply(
      v, x, capture=("block6a_expand_activation", "block6a_activation", "stem_activation",
                     "block7a_project_bn", "pool")), variables)
  assert logits.shape == (2, 12)
  assert feats["block6a_activation"].shape == (2, 4, 4, 672)   # block6a's depthwise has stride 2
  assert feats["block6a_expand_activation"].shape == (2, 8, 8, 672)
  assert feats["stem_activation"].shape == (2, 64, 64, 32)
  assert feats["block7a_project_bn"].shape == (2, 4, 4, 320) and feats["pool"].shape == (2, 1280)


def test_bad_arguments_name_themselves():
  for kwargs, field in (({"padding": "valid"}, "padding"), ({"dropout": 1.0}, "dropout"),
                        ({"drop_connect": -0.1}, "drop_connect"), ({"bn_epsilon": 0.0}, "bn_epsilon")):
    with pytest.raises(BadValue) as e:
      models.build({"name": "efficientnet_b0", **kwargs}, num_classes=3)
    assert e.value.field == field


def test_stochastic_depth_drops_residual_branches_only_in_training():
  model = models.build({"name": "efficientnet_b0", "drop_connect": 0.5, "dropout": 0.0},
                       num_classes=3, conv_impl="im2col")
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 2))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  train = jax.jit(lambda k: model.apply(variables, x, train=True, mutable=["batch_stats"],
                                        rngs={"drop_path": k})[0])
  a, b, a2 = train(jax.random.key(1)), train(jax.random.key(2)), train(jax.random.key(1))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, a2)
  with pytest.raises(Exception, match="drop_path"):  # training draws from the drop_path stream
    model.apply(variables, x, train=True, mutable=["batch_stats"])


def _randomise(shape, name, rng):
  if name in ("gamma", "moving_variance"):
    return rng.uniform(0.5, 1.5, shape)
  if name in ("beta", "moving_mean", "bias"):
    return rng.normal(0, 0.1, shape)
  return None


def test_keras_h5_import_equals_keras(tmp_path):
  os.environ.setdefault("KERAS_BACKEND", "jax")
  keras = pytest.importorskip("keras")
  pytest.importorskip("h5py")
  reference = keras.applications.EfficientNetB0(weights=None, input_shape=(128, 128, 5), classes=7)
  rng = np.random.default_rng(0)
  # Keras numbers auto-named layers per session: "normalization_1" after another model.
  norm = next(layer for layer in reference.layers if isinstance(layer, keras.layers.Normalization))
  for w in reference.weights:
    name = w.path.split("/")[-1]
    value = _randomise(w.shape, name, rng)
    if w.path.startswith(f"{norm.name}/"):
      value = {"mean": rng.normal(0, 5, w.shape), "variance": rng.uniform(1, 4, w.shape)}.get(name)
    if value is not None:
      w.assign(value.astype(np.float32))
  norm.finalize_state()  # it computes with copies of its weights
  path = tmp_path / "b0.h5"
  reference.save(path)
  x = np.random.default_rng(1).uniform(0, 255, (2, 128, 128, 5)).astype(np.float32)
  tap = keras.Model(reference.input, [reference.output, reference.get_layer("block6a_activation").output])
  probs, block6a = (np.asarray(t) for t in tap(x, training=False))

  imported = import_weights.from_keras_h5(path)
  assert imported.num_classes == 7 and imported.in_channels == 5
  t = imported.input_transform
  assert t["scale"] == pytest.approx(1 / 255) and t["mean"].shape == (5,)
  model = models.build(imported.spec, num_classes=7, conv_impl="xla")
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 128, 128, 5))))
  import_weights.check_matches(imported, abstract)
  inputs = (x * t["scale"] - t["mean"]) / np.sqrt(t["variance"])
  logits, feats = model.apply(imported.variables, inputs, capture=("block6a_activation",))
  _close(feats["block6a_activation"], block6a, "block6a_activation")
  _close(jax.nn.softmax(logits), probs, "class probabilities")
  _close(logits - logits.mean(-1, keepdims=True),
         np.log(probs) - np.log(probs).mean(-1, keepdims=True), "logits")


def test_torchvision_import_equals_torchvision():
  # With the bench extra (torch, torchvision); CI's test extra has Keras only: the one
  # CPU-only torch build this machine's index holds has no torchvision built for it.
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  torch.manual_seed(0)
  reference = torchvision.models.efficientnet_b0(num_classes=9)
  rng = np.random.default_rng(0)
  with torch.no_grad():
    for name, t in reference.state_dict().items():
      leaf = {"weight": "gamma", "running_var": "moving_variance", "running_mean": "moving_mean",
              "bias": "bias"}.get(name.split(".")[-1])
      if leaf == "gamma" and t.ndim != 1:
        continue  # a convolution or linear weight: keep torchvision's initialisation
      value = _randomise(tuple(t.shape), leaf, rng) if leaf else None
      if value is not None:
        t.copy_(torch.from_numpy(value.astype(np.float32)))
  reference.eval()
  x = np.random.default_rng(1).normal(0, 1, (2, 3, 96, 96)).astype(np.float32)
  captured = {}
  # features.6.0 is block6a; its block.1 (depthwise conv, BN, SiLU) is block6a_activation.
  def keep(module, inputs, output):  # returns None: the output goes on unchanged
    captured["block6a"] = output.detach().numpy()

  reference.features[6][0].block[1].register_forward_hook(keep)
  with torch.no_grad():
    theirs = reference(torch.from_numpy(x)).numpy()

  imported = import_weights.from_torchvision(reference.state_dict())
  assert imported.num_classes == 9 and imported.in_channels == 3
  model = models.build(imported.spec, num_classes=9, conv_impl="xla")
  logits, feats = model.apply(imported.variables, x.transpose(0, 2, 3, 1),
                              capture=("block6a_activation",))
  _close(feats["block6a_activation"], captured["block6a"].transpose(0, 2, 3, 1), "block6a_activation")
  _close(logits, theirs, "logits")
  # The CPU kernels the policy picks (im2col, Winograd) give the same numbers within tolerance.
  for impl in ("im2col", "winograd"):
    other = models.build(imported.spec, num_classes=9, conv_impl=impl)
    _close(other.apply(imported.variables, x.transpose(0, 2, 3, 1)), theirs, f"logits ({impl})")


def test_adapt_input_channels_and_clear_errors(tmp_path):
  model = models.build({"name": "efficientnet_b0"}, num_classes=4, conv_impl="xla")
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.normal(0, 1, s.shape).astype(np.float32), dict(shapes))
  imported = import_weights.Imported(variables, {"name": "efficientnet_b0"}, 4, 3)
  rgb = imported.variables["params"]["stem_conv"]["kernel"]
  # DeepProfiler's: the RGB kernels' mean in every channel.
  five = import_weights.adapt_input_channels(imported, 5, "average")
  kernel = five.variables["params"]["stem_conv"]["kernel"]
  assert kernel.shape == (3, 3, 5, 32) and five.in_channels == 5
  for c in range(5):
    np.testing.assert_allclose(kernel[:, :, c], rgb.mean(2), rtol=1e-6)
  # Tiled: a grey image (one value in all 6 channels) gives the RGB model's stem response.
  six = import_weights.adapt_input_channels(imported, 6, "tile")
  np.testing.assert_allclose(six.variables["params"]["stem_conv"]["kernel"].sum(2), rgb.sum(2),
                             rtol=1e-5, atol=1e-6)
  five_model = models.build({"name": "efficientnet_b0"}, num_classes=4, conv_impl="xla")
  import_weights.check_matches(five, jax.eval_shape(
      lambda: five_model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 5)))))
  with pytest.raises(BadValue, match="stem_conv"):
    import_weights.check_matches(imported, jax.eval_shape(
        lambda: five_model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 5)))))
  with pytest.raises(BadValue, match="method"):
    import_weights.adapt_input_channels(imported, 5, "sum")
  with pytest.raises(InputError, match="no such file"):
    import_weights.from_keras_h5(tmp_path / "missing.h5")
  (tmp_path / "bad.h5").write_bytes(b"not hdf5")
  with pytest.raises(InputError, match="not an HDF5 file"):
    import_weights.from_keras_h5(tmp_path / "bad.h5")
  with pytest.raises(BadValue, match="state_dict"):
    import_weights.from_torchvision({"features.0.0.weight": np.zeros((32, 3, 3, 3))})


def test_depthwise_kernels_are_initialised_as_keras_does():
  # Keras: variance_scaling(2, fan_out) on [k, k, C, 1], fan-out k * k: std sqrt(2 / k²),
  # whatever C (a fan-out of k² C would make them sqrt(C) times smaller).
  model = models.build({"name": "efficientnet_b0", "num_classes": 3})
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 5)))["params"]
  for block, k in (("block2a", 3), ("block6a", 5)):
    kernel = np.asarray(variables[block][f"{block}_dwconv"]["kernel"])
    assert kernel.shape[2] == 1
    assert abs(kernel.std() / np.sqrt(2.0 / k**2) - 1) < 0.1, (block, kernel.std())


def test_classifier_initialisers():
  # keras.applications: variance_scaling(1/3, fan_out, uniform); DeepProfiler's ClassProb:
  # Keras' default glorot_uniform. For 13 classes the first is ~9x wider.
  stds = {}
  for head in ("keras_applications", "glorot_uniform"):
    model = models.build({"name": "efficientnet_b0", "num_classes": 13, "head_init": head})
    kernel = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 5)))["params"]["predictions"]["kernel"]
    stds[head] = float(np.std(np.asarray(kernel)))
  assert abs(stds["keras_applications"] / np.sqrt(1 / 3 / 13) - 1) < 0.05
  assert abs(stds["glorot_uniform"] / np.sqrt(2 / (1280 + 13)) - 1) < 0.05
  with pytest.raises(BadValue, match="head_init"):
    models.build({"name": "efficientnet_b0", "head_init": "zeros"}, num_classes=3)
