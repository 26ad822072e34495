import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cellrep import models
from cellrep.errors import BadValue


def get_model(name, num_classes, **kwargs):
  return models.build({"name": name, **kwargs}, num_classes=num_classes)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_resnet50_parameter_count_matches_torchvision():
  # torchvision.models.resnet50() (3 input channels, 1000 classes): 25,557,032 parameters;
  # BN running statistics are buffers there and batch_stats here, not parameters.
  model = get_model("resnet50", 1000)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  assert _count(shapes["params"]) == 25_557_032


@pytest.mark.parametrize("name,count", [("resnet18", 11_689_512), ("resnet34", 21_797_672)])
def test_resnet_basic_parameter_counts(name, count):
  model = get_model(name, 1000)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  assert _count(shapes["params"]) == count


@pytest.mark.parametrize("stem,size", [("imagenet", 60), ("small", 24)])
def test_any_channel_count_and_train_mode(stem, size):
  model = get_model("resnet18", 5, width=0.125, stem=stem)
  x = jax.random.normal(jax.random.key(1), (4, size, size, 16))  # 14 markers + 2 masks
  variables = model.init(jax.random.key(0), x)
  assert variables["params"]["conv1"]["kernel"].shape[2] == 16
  logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert logits.shape == (4, 5) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  # Train mode updates running statistics; eval mode does not touch them.
  before = jax.tree.leaves(variables["batch_stats"])
  after = jax.tree.leaves(updates["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))
  logits_eval, feats = model.apply(variables, x, capture=("pool", "layer4", "stem"))
  assert feats["pool"].shape == (4, 8 * 8) and feats["pool"].dtype == jnp.float32
  np.testing.assert_allclose(feats["pool"], feats["layer4"].mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(logits_eval, model.apply(variables, x))
  assert feats["stem"].shape[-1] == 8


def test_capture_of_an_unknown_layer_names_the_known_ones():
  model = get_model("resnet18", 3, width=0.125, stem="small")
  x = jnp.zeros((1, 16, 16, 2))
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(BadValue, match="block6a_activation.*layer2_1"):
    model.apply(variables, x, capture=("block6a_activation",))


@pytest.mark.parametrize("kwargs,field", [
    ({"name": "resnet51"}, "name"), ({"width": 0}, "width"), ({"stem": "tiny"}, "stem"),
    ({"dtype": "float16"}, "dtype"), ({"conv_impl": "fft"}, "conv_impl"),
    ({"depth": 3}, "depth"), ({"num_classes": 0}, "num_classes")])
def test_the_model_checks_its_own_arguments(kwargs, field):
  spec = {"name": "resnet18", "num_classes": 3, **kwargs}
  with pytest.raises(BadValue) as e:
    models.build(spec)
  assert e.value.field == field


def test_registered_models_build_by_name():
  assert {"resnet18", "resnet34", "resnet50"} <= set(models.names())
  models.register("tiny_resnet_for_test", lambda num_classes: get_model("resnet18", num_classes,
                                                                          width=0.0625))
  net = models.build({"name": "tiny_resnet_for_test"}, num_classes=2)
  assert net.num_classes == 2 and net.width == 0.0625


def test_bfloat16_compute_keeps_float32_params():
  model = get_model("resnet18", 3, width=0.125, stem="small", dtype="bfloat16")
  x = jnp.ones((2, 16, 16, 4))
  variables = model.init(jax.random.key(0), x)
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(variables))
  assert model.apply(variables, x).dtype == jnp.float32
