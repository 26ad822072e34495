import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cellrep.models.resnet import ResNet
from cellrep.train.ensemble import MemberStep, make_mesh, make_train_step, resolve_strategy
from cellrep.train.state import abstract_state, create_state

MEMBERS, BATCH, SIZE, CHANNELS, CLASSES = 2, 8, 12, 4, 3


def _noisy_nhwc(key, crops):
  # Cheap stand-in for augmentation that still depends on the member's key.
  x = jnp.transpose(crops, (0, 2, 3, 1))
  return x + 0.1 * jax.random.normal(key, x.shape)


def _setup(mesh, members=MEMBERS):
  # Two residual stages are enough to exercise convs, BatchNorm and downsampling; the
  # engine is model-agnostic and a full ResNet-18 only adds compile time.
  model = ResNet(stage_sizes=(1, 1), block="basic", num_classes=CLASSES, width=0.125, stem="small")
  # SGD, not Adam: Adam divides by sqrt(v), turning rounding noise on a near-zero
  # gradient into an O(lr) step, which would hide a real mismatch behind a loose tolerance.
  tx = optax.sgd(0.1, momentum=0.9)
  shape = (1, SIZE, SIZE, CHANNELS)
  state = create_state(jax.random.key(0), model, tx, shape, members, mesh)
  abstract = abstract_state(model, tx, shape, members, mesh)
  return MemberStep(model, tx, _noisy_nhwc), state, abstract


def _batches(n):
  rng = np.random.default_rng(0)
  for _ in range(n):
    yield {"crop": rng.normal(size=(BATCH, CHANNELS, SIZE, SIZE)).astype(np.float32),
           "label": rng.integers(0, CLASSES, BATCH).astype(np.int32)}


def _run(strategy, mesh, steps=3, members=MEMBERS):
  member_step, state, abstract = _setup(mesh, members)
  step = make_train_step(member_step, mesh, abstract, strategy)
  losses = []
  for batch in _batches(steps):
    state, metrics = step(state, batch, jax.random.key(1))
    losses.append(np.asarray(metrics["loss"]))
  return jax.device_get(state), np.stack(losses)


def test_auto_is_loop_on_cpu_and_vmap_elsewhere():
  assert resolve_strategy("auto", "cpu") == "loop"
  assert resolve_strategy("auto", "gpu") == "vmap"
  assert resolve_strategy("auto", "tpu") == "vmap"


def test_state_has_member_axis_and_members_differ():
  _, state, abstract = _setup(make_mesh(1, 1))
  for leaf, spec in zip(jax.tree.leaves(state), jax.tree.leaves(abstract)):
    assert leaf.shape[0] == MEMBERS and leaf.shape == spec.shape
  kernel = state.params["conv1"]["kernel"]
  assert not np.allclose(kernel[0], kernel[1])


@pytest.mark.parametrize("strategy", ["vmap", "map"])
def test_strategies_match_loop(strategy):
  # Same members, keys and batches: parameters after 3 Adam steps agree to float32
  # rounding of differently ordered convolution sums.
  mesh = make_mesh(1, 1)
  ref_state, ref_losses = _run("loop", mesh)
  state, losses = _run(strategy, mesh)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(state.step) == 3)


def test_members_see_different_augmentations():
  _, losses = _run("loop", make_mesh(1, 1), steps=1)
  assert losses.shape == (1, MEMBERS) and losses[0, 0] != losses[0, 1]


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_member_x_data_mesh_on_8_devices_matches_unsharded(strategy):
  assert jax.device_count() == 8
  ref_state, ref_losses = _run(strategy, make_mesh(1, 1, jax.devices()[:1]), steps=2, members=4)
  state, losses = _run(strategy, make_mesh(2, 4), steps=2, members=4)
  # BatchNorm statistics over a data-sharded batch are all-reduced: same numbers up to
  # float32 reduction order.
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
