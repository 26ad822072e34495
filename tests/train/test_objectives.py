"""Each objective through the one ensemble step and predictor, on a toy model registered by name,
over a member x data mesh of 8 virtual CPU devices: no task code involved."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cellrep import models
from cellrep.data.pipeline import data_sharding
from cellrep.infer.predict import make_predict_fn, predict as predict_batches
from cellrep.models.layers import Conv, Taps
from cellrep.models.masking import patch_mask
from cellrep.train import objectives
from cellrep.train.ensemble import MemberStep, make_mesh, make_train_step
from cellrep.train.loop import fit
from cellrep.train.metrics import MetricWriter, read_metrics
from cellrep.train.state import abstract_state, create_state

MEMBERS, BATCH, SIZE, CHANNELS, CLASSES = 4, 8, 8, 3, 5


class Toy(nn.Module):
  """A convolution, BatchNorm and a head: class logits, or a reconstruction of masked input."""
  outputs: int = CLASSES
  head: str = "classes"

  @nn.compact
  def __call__(self, x, train: bool = False, capture=()):
    taps, mask = Taps(capture), None
    if self.head == "reconstruction":
      mask = (patch_mask(self.make_rng("mask"), x.shape[:3], 4, 0.25) if train
              else jnp.zeros(x.shape[:3]))
      x = x * (1 - mask[..., None])
    h = taps("features", nn.relu(nn.BatchNorm(use_running_average=not train)(Conv(8, (3, 3))(x))))
    if self.head == "reconstruction":
      return taps.result({"reconstruction": Conv(x.shape[-1], (1, 1))(h), "mask": mask})
    return taps.result(nn.Dense(self.outputs)(taps("pool", h.mean(axis=(1, 2)))))


models.register("toy", Toy)


def _nhwc(key, crops):
  return jnp.transpose(crops, (0, 2, 3, 1))


def _batch(kind):
  rng = np.random.default_rng(0)
  crop = rng.normal(size=(BATCH, CHANNELS, SIZE, SIZE)).astype(np.float32)
  if kind == "softmax":
    return {"crop": crop, "label": rng.integers(0, CLASSES, BATCH).astype(np.int32)}
  if kind == "sigmoid":
    return {"crop": crop, "label": (rng.random((BATCH, CLASSES)) < 0.3).astype(np.float32)}
  # Hidden patches can be recovered only from what all images share: a level per channel.
  return {"crop": crop * 0.1 + np.arange(1, CHANNELS + 1, dtype=np.float32)[:, None, None]}


CASES = {
    "softmax": ({}, objectives.build("softmax_cross_entropy", label_smoothing=0.1)),
    "sigmoid": ({}, objectives.build("sigmoid_binary_cross_entropy",
                                     class_weights=(1.0, 0.5, 2.0, 1.0, 1.0))),
    "reconstruction": ({"head": "reconstruction", "outputs": 0},
                       objectives.build("masked_reconstruction")),
}


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("strategy", ["vmap", "map"])
def test_every_objective_trains_through_the_ensemble_step(kind, strategy, tmp_path):
  assert jax.device_count() == 8
  kwargs, objective = CASES[kind]
  model = models.build({"name": "toy", **kwargs})
  mesh = make_mesh(2, 4)
  tx = optax.adam(1e-2)
  shape = (1, SIZE, SIZE, CHANNELS)
  state = create_state(jax.random.key(0), model, tx, shape, MEMBERS, mesh)
  step = make_train_step(MemberStep(model, tx, _nhwc, objective),
                         mesh, abstract_state(model, tx, shape, MEMBERS, mesh), strategy)
  batch = _batch(kind)
  writer = MetricWriter(tmp_path, tensorboard=False)
  state = fit(state, step, iter([batch] * 30), rng=jax.random.key(1), num_steps=30,
              data_sharding=data_sharding(mesh), writer=writer, log_every=10, progress=False)
  records = read_metrics(tmp_path)
  # The loop logs whatever the objective names, per member averaged; the loss goes down.
  assert {f"train/{m}" for m in objective.metrics + ("grad_norm",)} <= set(records[0])
  assert records[-1]["train/loss"] < 0.9 * records[0]["train/loss"]
  assert np.all(np.asarray(state.step) == 30)

  predict = make_predict_fn(model, lambda crops: _nhwc(None, crops), mesh, "auto",
                            objective=objective)
  out = np.asarray(predict(state.variables, jnp.asarray(batch["crop"])))
  if kind == "reconstruction":
    assert out.shape == (MEMBERS, BATCH, SIZE, SIZE, CHANNELS)
    batches = [dict(batch, index=np.arange(BATCH))]
    index, per_cell = predict_batches(state.variables, predict, batches, data_sharding(mesh))
    assert per_cell.shape == (BATCH, MEMBERS, SIZE, SIZE, CHANNELS)
    np.testing.assert_allclose(per_cell, np.swapaxes(out, 0, 1), rtol=1e-6)
  else:
    assert out.shape == (MEMBERS, BATCH, CLASSES) and 0 <= out.min() and out.max() <= 1
    if kind == "softmax":
      np.testing.assert_allclose(out.sum(-1), 1, rtol=1e-5)


def test_members_and_steps_draw_their_own_masks():
  step = MemberStep(models.build({"name": "toy", "head": "reconstruction"}), optax.sgd(0.1),
                    _nhwc, objectives.MaskedReconstruction())
  rng = jax.random.key(0)
  masks = [patch_mask(step.rngs(rng, m, s)["mask"], (2, 8, 8), 4, 0.5)
           for m, s in ((0, 0), (1, 0), (0, 1))]
  assert all(float(m.sum()) == 2 * 32 for m in masks)  # half of each image's 4 patches
  assert not np.array_equal(masks[0], masks[1]) or not np.array_equal(masks[0], masks[2])
  keys = [step.rngs(rng, m, s)["dropout"] for m, s in ((0, 0), (1, 0), (0, 1))]
  assert len({tuple(np.asarray(jax.random.key_data(k)).ravel()) for k in keys}) == 3


def test_objective_values():
  logits = jnp.array([[2.0, -1.0], [0.0, 3.0]])
  sig = objectives.SigmoidBinaryCrossEntropy(class_weights=(1.0, 0.0))
  loss, m = sig.loss(logits, {"label": jnp.array([[1.0, 0.0], [0.0, 1.0]])})
  expected = np.mean([np.log1p(np.exp(-2.0)), 0.0, np.log1p(np.exp(0.0)), 0.0])
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert float(m["exact_match"]) == 0.5 and float(m["label_accuracy"]) == 0.75
  np.testing.assert_allclose(m["micro_f1"], 2 * 2 / (2 * 2 + 1), rtol=1e-6)  # tp 2, fp 1
  rec = objectives.MaskedReconstruction()
  images = jnp.zeros((1, 2, 2, 1))
  outputs = {"reconstruction": jnp.array([[[[1.0], [2.0]], [[0.0], [0.0]]]]),
             "mask": jnp.array([[[1.0, 0.0], [0.0, 0.0]]])}
  loss, m = rec.loss(outputs, {"images": images})
  assert float(loss) == float(m["mse_masked"]) == 1.0 and float(m["mse_all"]) == 5.0 / 4
  loss, _ = objectives.MaskedReconstruction(masked_only=False).loss(outputs, {"images": images})
  assert float(loss) == 5.0 / 4
  assert objectives.class_weights([1, 3]) == (0.75, 0.25)
  assert objectives.class_weights([1, 3, 0], "inverse_frequency") == (4 / 3, 4 / 9, 0.0)
  for obj in (objectives.SoftmaxCrossEntropy(0.1), sig, rec):
    assert objectives.from_dict(objectives.to_dict(obj)) == obj
