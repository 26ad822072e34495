import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cellrep.data.pipeline import data_sharding
from cellrep.errors import NonFiniteLossError
from cellrep.train.checkpoint import Checkpointer
from cellrep.train.ensemble import make_mesh
from cellrep.train.loop import fit
from cellrep.train.metrics import MetricWriter, read_metrics
from cellrep.train.state import TrainState


def _batches():
  def item(i):
    return {"crop": np.full((2, 1, 2, 2), i, np.float32), "label": np.zeros(2, np.int32),
            "index": np.arange(2)}
  return iter(grain.MapDataset.range(100).map(item).to_iter_dataset())


def _state():
  z = jnp.zeros((2, 3))
  return TrainState(step=jnp.zeros(2, jnp.int32), params={"w": z}, batch_stats={"b": z},
                    opt_state={"o": z})


def _step(nan_at: int):
  def step(state, batch, rng):
    loss = jnp.where(state.step + 1 == nan_at, jnp.nan, 1.0 / (state.step + 1))
    new = state.replace(step=state.step + 1, params={"w": state.params["w"] + batch["crop"].mean()})
    return new, {"loss": loss, "accuracy": jnp.zeros(2)}
  return step


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=5)
  with pytest.raises(NonFiniteLossError, match=r"step 5 \(members \[0, 1\]\).*step 4"):
    fit(_state(), _step(nan_at=5), _batches(), rng=jax.random.key(0), num_steps=10,
        data_sharding=data_sharding(make_mesh(1, 1)), writer=MetricWriter(tmp_path),
        checkpointer=ckpt, checkpoint_every=2, log_every=3, progress=False)
  ckpt.wait()
  assert ckpt.latest_step() == 4
  assert [m["step"] for m in read_metrics(tmp_path)] == [2, 3, 4]


def test_hooks_metrics_and_checkpoint_contents(tmp_path):
  calls = []
  ckpt = Checkpointer(tmp_path / "ckpt")
  batches = _batches()
  state = fit(_state(), _step(nan_at=-1), batches, rng=jax.random.key(0), num_steps=4,
              data_sharding=data_sharding(make_mesh(1, 1)), writer=MetricWriter(tmp_path),
              checkpointer=ckpt, checkpoint_every=4, log_every=2, progress=False,
              learning_rate=lambda s: 0.1 * s, hooks=[(2, lambda s, st: calls.append(s))])
  assert calls == [2, 4]
  m = read_metrics(tmp_path)
  assert [r["step"] for r in m] == [2, 4] and m[1]["train/lr"] == pytest.approx(0.3)
  np.testing.assert_allclose(state.params["w"], 0 + 1 + 2 + 3)
  fresh = _batches()
  restored = ckpt.restore(4, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state),
                          fresh)
  np.testing.assert_allclose(restored.params["w"], state.params["w"])
  assert next(fresh)["crop"][0, 0, 0, 0] == 4  # the iterator resumes after 4 batches


def _fit_until_error(tmp_path, step, checkpoint_every=1):
  ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=2)
  with pytest.raises(NonFiniteLossError) as info:
    fit(_state(), step, _batches(), rng=jax.random.key(0), num_steps=10,
        data_sharding=data_sharding(make_mesh(1, 1)), writer=MetricWriter(tmp_path),
        checkpointer=ckpt, checkpoint_every=checkpoint_every, log_every=1, progress=False)
  ckpt.wait()
  return str(info.value), ckpt


def test_non_finite_gradients_stop_as_a_non_finite_loss(tmp_path):
  def step(state, batch, rng):
    new, metrics = _step(nan_at=-1)(state, batch, rng)
    return new, dict(metrics, grad_norm=jnp.where(state.step + 1 >= 3, jnp.nan, 1.0))

  message, ckpt = _fit_until_error(tmp_path, step)
  assert "non-finite gradients at step 3" in message and "step 2" in message
  assert ckpt.latest_step() == 2


def test_non_finite_parameters_are_never_checkpointed(tmp_path):
  # Loss and gradients finite, the update overflows: the state is checked before saving.
  def step(state, batch, rng):
    new, metrics = _step(nan_at=-1)(state, batch, rng)
    w = jnp.where(state.step[:, None] + 1 >= 4, jnp.inf, new.params["w"])
    return new.replace(params={"w": w}), metrics

  message, ckpt = _fit_until_error(tmp_path, step)
  assert "non-finite parameters at step 4" in message and "(step 3)" in message
  assert ckpt.latest_step() == 3
