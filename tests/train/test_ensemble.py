import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cellrep.models.resnet import ResNet
from cellrep.ops.policy import resolve
from cellrep.train.ensemble import MemberStep, make_mesh, make_train_step, plan_members
from cellrep.train.state import abstract_state, create_state

MEMBERS, BATCH, SIZE, CHANNELS, CLASSES = 2, 8, 12, 4, 3


def _noisy_nhwc(key, crops):
  # Cheap stand-in for augmentation that still depends on the member's key.
  x = jnp.transpose(crops, (0, 2, 3, 1))
  return x + 0.1 * jax.random.normal(key, x.shape)


def _setup(mesh, members=MEMBERS, conv_impl="auto"):
  # Two residual stages are enough to exercise convs, BatchNorm and downsampling; the
  # engine is model-agnostic and a full ResNet-18 only adds compile time.
  model = ResNet(stage_sizes=(1, 1), block="basic", num_classes=CLASSES, width=0.125, stem="small",
                 conv_impl=conv_impl)
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


def _run(strategy, mesh, steps=3, members=MEMBERS, conv_impl="auto", **kwargs):
  member_step, state, abstract = _setup(mesh, members, conv_impl)
  step = make_train_step(member_step, mesh, abstract, strategy, **kwargs)
  losses = []
  for batch in _batches(steps):
    state, metrics = step(state, batch, jax.random.key(1))
    losses.append(np.asarray(metrics["loss"]))
  return jax.device_get(state), np.stack(losses)


def test_auto_is_vmap_chunked_by_memory():
  assert resolve(platform_name="cpu").strategy == resolve(platform_name="gpu").strategy == "vmap"
  assert resolve(platform_name="cpu").memory_budget > 0  # chunked by memory on a CPU only
  assert resolve(platform_name="gpu").memory_budget is None
  # All members fit: vmap; else the largest divisor of the members that fits.
  assert plan_members(10, 100, 1e4) == ("vmap", 10)
  assert plan_members(10, 100, 450) == ("map", 2)
  assert plan_members(10, 100, 50) == ("map", 1)
  # Members sharded over 2 devices: 5 per device.
  assert plan_members(10, 100, 450, devices_per_member_axis=2) == ("map", 1)
  assert plan_members(10, 100, 500, devices_per_member_axis=2) == ("vmap", 5)


def test_auto_on_cpu_plans_from_the_saved_activations():
  mesh = make_mesh(1, 1)
  member_step, _, abstract = _setup(mesh, members=4)
  batch = next(_batches(1))
  saved = member_step.saved_bytes(abstract, batch)
  # At least the input images and the logits of the batch are kept for the backward pass.
  assert saved > 4 * BATCH * (SIZE * SIZE * CHANNELS + CLASSES)
  roomy = make_train_step(member_step, mesh, abstract, "auto", batch=batch, memory_budget=4 * saved)
  tight = make_train_step(member_step, mesh, abstract, "auto", batch=batch, memory_budget=2.5 * saved)
  assert (roomy.strategy, roomy.map_batch) == ("vmap", 4)
  assert (tight.strategy, tight.map_batch) == ("map", 2)
  # Without a batch the step plans at its first call.
  lazy = make_train_step(member_step, mesh, abstract, "auto", memory_budget=2.5 * saved)
  assert lazy.strategy == "auto" and lazy.resolved(batch).strategy == "map"


def test_state_has_member_axis_and_members_differ():
  _, state, abstract = _setup(make_mesh(1, 1))
  for leaf, spec in zip(jax.tree.leaves(state), jax.tree.leaves(abstract)):
    assert leaf.shape[0] == MEMBERS and leaf.shape == spec.shape
  kernel = state.params["conv1"]["kernel"]
  assert not np.allclose(kernel[0], kernel[1])


@pytest.mark.parametrize("strategy,conv_impl,kwargs", [
    ("vmap", "im2col", {}),
    ("vmap", "xla", {}),            # the accelerator path: grouped convolutions
    ("map", "im2col", {}),
    ("map", "im2col", {"map_batch": 2}),
    ("auto", "auto", {"memory_budget": 1.0}),  # so tight that it maps one member at a time
])
def test_strategies_match_loop(strategy, conv_impl, kwargs):
  # Same members, keys and batches: parameters after 3 SGD steps agree to float32
  # rounding of differently ordered convolution sums.
  mesh = make_mesh(1, 1)
  ref_state, ref_losses = _run("loop", mesh, conv_impl="xla")
  state, losses = _run(strategy, mesh, conv_impl=conv_impl, **kwargs)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(state.step) == 3)


def test_members_see_different_augmentations():
  _, losses = _run("loop", make_mesh(1, 1), steps=1)
  assert losses.shape == (1, MEMBERS) and losses[0, 0] != losses[0, 1]


@pytest.mark.parametrize("strategy", ["vmap", "map", "loop"])
def test_member_x_data_mesh_on_8_devices_matches_unsharded(strategy):
  assert jax.device_count() == 8
  ref_state, ref_losses = _run(strategy, make_mesh(1, 1, jax.devices()[:1]), steps=2, members=4)
  state, losses = _run(strategy, make_mesh(2, 4), steps=2, members=4)
  # BatchNorm statistics over a data-sharded batch are all-reduced: same numbers up to
  # float32 reduction order.
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_lower_gives_each_program_with_its_calls_per_step():
  # What benchmarks/bench_ensemble.py reads FLOPs and compile times from.
  mesh = make_mesh(1, 1)
  member_step, _, abstract = _setup(mesh)
  batch = next(_batches(1))
  for strategy, calls in [("loop", MEMBERS), ("vmap", 1)]:
    (lowered, n), = make_train_step(member_step, mesh, abstract, strategy).lower(
        abstract, batch, jax.random.key(1))
    cost = lowered.compile().cost_analysis()
    assert n == calls and cost["flops"] > 0


def test_one_member_vmap_matches_loop():
  # One member runs its own program, without a vmap of size 1.
  mesh = make_mesh(1, 1)
  ref_state, ref_losses = _run("loop", mesh, members=1, conv_impl="xla")
  state, losses = _run("vmap", mesh, members=1)
  assert losses.shape == (3, 1)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_one_member_on_cpu_writes_a_fresh_state_and_ensembles_donate():
  # Donated, XLA:CPU copied one member's parameters and Adam moments every step.
  mesh = make_mesh(1, 1)
  for members, donate in [(1, ()), (MEMBERS, (0,))]:
    member_step, state, abstract = _setup(mesh, members)
    step = make_train_step(member_step, mesh, abstract, "vmap")
    assert step.donate_argnums == donate
    old = jax.tree.leaves(state)[0]
    step(state, next(_batches(1)), jax.random.key(1))
    assert old.is_deleted() == bool(donate)
