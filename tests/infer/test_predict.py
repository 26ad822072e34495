import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
import pytest

from cellrep.infer.predict import (cellsighter_csv, ensemble, make_predict_fn, predict,
                                   predictions_table)
from cellrep.models.resnet import ResNet
from cellrep.train.ensemble import make_mesh
from cellrep.train.state import create_state
from cellrep.data.pipeline import data_sharding
from tests.models.helpers import WINOGRAD_DOT, random_bn_scales


def _nhwc(crops):
  return jnp.transpose(crops, (0, 2, 3, 1))


def test_ensemble_is_mean_argmax_max():
  p = np.array([[[0.6, 0.4], [0.2, 0.8]], [[0.9, 0.1], [0.7, 0.3]]])  # [N=2, M=2, C=2]
  mean, pred, conf = ensemble(p)
  np.testing.assert_allclose(mean, [[0.4, 0.6], [0.8, 0.2]])
  assert pred.tolist() == [1, 0]
  np.testing.assert_allclose(conf, [0.6, 0.8])


@pytest.mark.parametrize("strategy,map_batch", [("vmap", 1), ("map", 1), ("map", 2), ("auto", 1)])
def test_strategies_predict_the_same(strategy, map_batch):
  mesh = make_mesh(1, 1)
  model = ResNet(stage_sizes=(1,), block="basic", num_classes=3, width=0.125, stem="small")
  state = create_state(jax.random.key(0), model, optax.sgd(0.1), (1, 8, 8, 4), 3, mesh)
  rng = np.random.default_rng(0)
  batches = [{"crop": rng.normal(size=(4, 4, 8, 8)).astype(np.float32),
              "label": np.zeros(4, np.int32), "index": np.array([0, 1, 2, -1])}]
  ref_idx, ref = predict(state.variables, make_predict_fn(model, _nhwc, mesh, "loop"), batches,
                         data_sharding(mesh))
  idx, probs = predict(state.variables,
                       make_predict_fn(model, _nhwc, mesh, strategy, map_batch=map_batch), batches,
                       data_sharding(mesh))
  assert ref.shape == (3, 3, 3) and ref_idx.tolist() == [0, 1, 2]  # padding dropped
  np.testing.assert_allclose(probs, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ref.sum(-1), 1, rtol=1e-5)
  assert not np.allclose(ref[:, 0], ref[:, 1])  # members differ


def test_auto_predicts_with_winograd_on_cpu_as_xla_convolutions_do():
  mesh = make_mesh(1, 1)
  model = ResNet(stage_sizes=(1, 1), block="basic", num_classes=3, width=0.25, stem="small")
  state = create_state(jax.random.key(0), model, optax.sgd(0.1), (1, 12, 12, 4), 3, mesh)
  variables = random_bn_scales(state.variables)
  crops = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4, 12, 12)), jnp.float32)
  auto = make_predict_fn(model, _nhwc, mesh, "map", dtype="float32")
  xla = make_predict_fn(model.clone(conv_impl="xla"), _nhwc, mesh, "map", dtype="float32")
  np.testing.assert_allclose(auto(variables, crops), xla(variables, crops), rtol=1e-4, atol=1e-6)
  text = auto.lower(variables, crops).as_text()
  assert "convolution" not in text
  assert WINOGRAD_DOT.search(text)
  assert not WINOGRAD_DOT.search(make_predict_fn(model.clone(conv_impl="im2col"), _nhwc, mesh,
                                                 "map", dtype="float32"
                                                 ).lower(variables, crops).as_text())


def test_bfloat16_predictor_agrees_with_float32():
  mesh = make_mesh(1, 1)
  model = ResNet(stage_sizes=(1, 1), block="bottleneck", num_classes=5, width=0.25)
  state = create_state(jax.random.key(1), model, optax.sgd(0.1), (1, 32, 32, 6), 2, mesh)
  variables = random_bn_scales(state.variables)
  # A peaked classifier, so that probabilities are not all near 1/5.
  variables = jax.tree_util.tree_map_with_path(
      lambda p, x: x * 30 if "fc" in str(p) and p[-1].key == "kernel" else x, variables)
  crops = jnp.asarray(np.random.default_rng(1).poisson(3.0, (16, 6, 32, 32)), jnp.float32)
  f32 = make_predict_fn(model, _nhwc, mesh, "map", dtype="float32")
  bf16 = make_predict_fn(model, _nhwc, mesh, "map", dtype="bfloat16")
  ref, out = np.asarray(f32(variables, crops)), np.asarray(bf16(variables, crops))
  assert out.dtype == np.float32 and ref.max() > 0.9
  np.testing.assert_allclose(out.sum(-1), 1, rtol=1e-5)
  diff = np.abs(out - ref)
  assert diff.max() < 0.05 and diff.mean() < 0.005, (diff.max(), diff.mean())
  assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
  # bfloat16 products (im2col: no Winograd tile positions), float32 accumulation.
  text = bf16.lower(variables, crops).as_text()
  assert "xbf16>, tensor<" in text and not WINOGRAD_DOT.search(text.replace("xbf16>", "xf32>"))


def test_tables():
  cells = pd.DataFrame({"cell_id": [5, 9], "fov": [0, 0], "fov_name": ["a", "a"],
                        "label": pd.array(["T", None], dtype="string"), "y": [1, 2],
                        "Metadata_Plate": ["P", "P"]})
  member_probs = np.array([[[0.7, 0.3], [0.5, 0.5]], [[0.1, 0.9], [0.3, 0.7]]], np.float32)
  table = predictions_table(cells, ["T", "B"], member_probs)
  assert table.pred.tolist() == ["T", "B"]
  np.testing.assert_allclose(table.confidence, [0.6, 0.8], rtol=1e-6)
  assert "Metadata_Plate" in table and "y" not in table
  csv = cellsighter_csv(table, ["T", "B"])
  assert csv.pred.tolist() == [0, 1] and csv.label.tolist() == [0, -1]
  assert csv.image_id.tolist() == ["a", "a"]
  assert eval(csv.prob_list[1]) == pytest.approx([0.2, 0.8])
