import numpy as np

from cellrep.data.crops import CropSource
from cellrep.data.pipeline import data_sharding, eval_batches, to_device, train_dataset
from cellrep.data.sampling import EpochSampler
from cellrep.train.ensemble import make_mesh
from tests.data.helpers import square_cells_store


def test_train_batches_and_resume_from_iterator_state(tmp_path):
  src = CropSource(square_cells_store(tmp_path / "s"), crop_size=8)
  sampler = EpochSampler(np.arange(len(src)), num_samples=40, seed=0)
  ds = train_dataset(src, sampler, batch_size=4, threads=2)
  it = iter(ds)
  first = [next(it) for _ in range(3)]
  assert first[0]["crop"].shape == (4, 5, 8, 8) and first[0]["label"].dtype == np.int32
  np.testing.assert_array_equal(first[0]["index"], [sampler[i] for i in range(4)])
  state = it.get_state()
  rest = [b["index"] for b in it]
  assert len(rest) == 7  # 40 samples / 4, 3 already read
  it2 = iter(train_dataset(src, sampler, batch_size=4, threads=2))
  it2.set_state(state)
  np.testing.assert_array_equal(np.stack([b["index"] for b in it2]), np.stack(rest))


def test_eval_batches_in_order_with_padding(tmp_path):
  src = CropSource(square_cells_store(tmp_path / "s"), crop_size=8)
  idx = np.arange(3, 14)
  batches = list(eval_batches(src, idx, batch_size=4, threads=2))
  assert [len(b["index"]) for b in batches] == [4, 4, 4]
  flat = np.concatenate([b["index"] for b in batches])
  np.testing.assert_array_equal(flat, list(range(3, 14)) + [-1])
  assert np.all(batches[-1]["crop"][-1] == 0)


def test_to_device_shards_batch_over_data_axis(tmp_path):
  mesh = make_mesh(2, 4)
  batch = {"crop": np.zeros((8, 5, 4, 4), np.float32), "label": np.arange(8, dtype=np.int32),
           "index": np.arange(8)}
  out = to_device(batch, data_sharding(mesh))
  assert set(out) == {"crop", "label"}
  assert len(out["crop"].sharding.device_set) == 8
  assert out["crop"].addressable_shards[0].data.shape == (2, 5, 4, 4)
  np.testing.assert_array_equal(np.asarray(out["label"]), np.arange(8))
