"""Microsnoop's full-field modes against hand-computed small cases (tiles, rescale, cell regions),
their embeddings against the single-cell path and their own parts, and the batch-experiment
profiles against ZCA-cor written out in numpy."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from cellrep import models
from cellrep.data.crops import CropSource
from cellrep.errors import BadValue
from cellrep.infer import embed as embed_lib
from cellrep.infer import fields
from cellrep.infer.trained import Trained
from cellrep.ops import policy as policy_lib
from cellrep.train.ensemble import make_mesh
from tests.data.helpers import square_cells_store


def _image(k, h, w):
  """Every pixel its own non-zero value, so that zeros can only be padding."""
  return (np.arange(k * h * w, dtype=np.float32).reshape(k, h, w) + 1)


# ---------------------------------------------------------------- tiles


def test_tiles_of_a_10px_image_are_its_slices_at_stride_3():
  image = _image(2, 10, 10)
  got, origins = fields.tiles(image, size=4, overlap=0.25)  # stride round(4 x 0.75) = 3
  want = [(y, x) for y in (0, 3, 6) for x in (0, 3, 6)]  # the last tile flush with the edge
  assert origins.tolist() == [list(o) for o in want] and got.shape == (9, 2, 4, 4)
  for tile, (y, x) in zip(got, want):
    np.testing.assert_array_equal(tile, image[:, y:y + 4, x:x + 4])
  # 9 px at stride 3: 0, 3, then 5 (flush), not 6 (past the edge).
  assert fields.tile_origins((9, 4), 4, 0.25).tolist() == [[0, 0], [3, 0], [5, 0]]
  # Microsnoop's 224 px and 0.1: stride round(201.6) = 202 over a 1080 px side.
  assert fields.tile_origins((1080, 224))[:, 0].tolist() == [0, 202, 404, 606, 808, 856]
  assert fields.tile_origins((224, 224), overlap=0.0).tolist() == [[0, 0]]


def test_an_image_smaller_than_a_tile_is_one_zero_padded_tile():
  image = _image(1, 3, 3)
  got, origins = fields.tiles(image, size=4, overlap=0.1)
  assert got.shape == (1, 1, 4, 4) and origins.tolist() == [[0, 0]]  # 1 px pad, after
  want = np.zeros((1, 4, 4), np.float32)
  want[:, :3, :3] = image
  np.testing.assert_array_equal(got[0], want)
  # Padded centred per axis: 2 rows into 5 (1 before), 10 columns tiled at stride 3.
  image = _image(1, 2, 10)
  got, origins = fields.tiles(image, size=5, overlap=0.4)
  assert origins.tolist() == [[-1, 0], [-1, 3], [-1, 5]]
  want = np.zeros((1, 5, 5), np.float32)
  want[:, 1:3] = image[:, :, 3:8]
  np.testing.assert_array_equal(got[1], want)


# ---------------------------------------------------------------- rescale


def test_rescale_is_the_block_mean_of_the_square_padded_fov():
  blocky = np.kron(np.array([[1.0, 2.0], [3.0, 4.0]]), np.ones((2, 2)))[None]  # 4 x 4
  np.testing.assert_array_equal(fields.rescale(blocky, 2), [[[1, 2], [3, 4]]])
  image = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
  np.testing.assert_allclose(fields.rescale(image, 2), [[[2.5, 4.5], [10.5, 12.5]]], atol=1e-6)
  # 2 x 4 -> padded to 4 x 4 (a zero row before and after) -> 2 x 2.
  wide = np.array([[[1, 2, 3, 4], [5, 6, 7, 8]]], np.float32)
  np.testing.assert_allclose(fields.rescale(wide, 2), [[[0.75, 1.75], [2.75, 3.75]]], atol=1e-6)
  # 3 -> 2 is not a whole factor: output pixel 0 covers input 0 and half of 1, weights
  # (2/3, 1/3, 0) and (0, 1/3, 2/3) on each axis.
  nine = np.arange(9, dtype=np.float32).reshape(1, 3, 3)
  np.testing.assert_allclose(fields.rescale(nine, 2), [[[4 / 3, 8 / 3], [16 / 3, 20 / 3]]],
                             atol=1e-6)
  # Up-sizing spreads a pixel over the outputs it covers; intensity is kept either way.
  np.testing.assert_allclose(fields.rescale(np.full((2, 1, 1), 7.0), 3), np.full((2, 3, 3), 7),
                             rtol=1e-6)
  assert fields.rescale(_image(3, 5, 7), 4).sum() == pytest.approx(
      np.pad(_image(3, 5, 7), ((0, 0), (1, 1), (0, 0))).sum() * 16 / 49, rel=1e-6)


# ---------------------------------------------------------------- cell regions


def _one_cell():
  mask = np.zeros((20, 20), np.int32)
  mask[2:6, 10:13] = 5   # box 4 rows x 3 columns: centre (2 + 2, 10 + 1) = (4, 11)
  mask[14:17, 18:20] = 9  # box 3 x 2 at the right edge: centre (15, 19)
  return _image(2, 20, 20), mask


@pytest.mark.parametrize("ratio,side", [(2.5, 10), (2.0, 8)])
def test_cell_region_is_the_box_times_the_ratio_zero_padded(ratio, side):
  image, mask = _one_cell()
  got = fields.cell_regions(image, mask, [5], ratio=ratio, size=12)
  assert got.shape == (1, 2, 12, 12) and got.dtype == np.float32
  top, left, at = 4 - side // 2, 11 - side // 2, (12 - side) // 2
  want = np.zeros((2, 12, 12), np.float32)
  # ratio 2.5: rows -1..8, the first above the image (zeros); ratio 2: rows 0..7.
  rows = slice(max(top, 0), top + side)
  want[:, at + max(-top, 0):at + side, at:at + side] = image[:, rows, left:left + side]
  np.testing.assert_array_equal(got[0], want)


def test_cell_region_at_the_edge_capped_and_resized():
  image, mask = _one_cell()
  # Cell 9: side ceil(2.5 x 3) = 8, rows 11..18, columns 15..22, of which 20..22 are past
  # the image: zeros.
  got = fields.cell_regions(image, mask, [9, 5], ratio=2.5, size=8)
  want = np.zeros((2, 8, 8), np.float32)
  want[:, :, :5] = image[:, 11:19, 15:20]
  np.testing.assert_array_equal(got[0], want)
  # The cap: cell 5 at ratio 2.5 (10 px) capped to 6, rows 1..6, columns 8..13.
  capped = fields.cell_regions(image, mask, [5], ratio=2.5, cap=6, size=8)
  want = np.zeros((2, 8, 8), np.float32)
  want[:, 1:7, 1:7] = image[:, 1:7, 8:14]
  np.testing.assert_array_equal(capped[0], want)
  # Over the input side (cap > size): the 10 px window area-resized to 5, 2 x 2 block means.
  window = np.zeros((2, 10, 10), np.float32)
  window[:, 1:] = image[:, 0:9, 6:16]
  resized = fields.cell_regions(image, mask, [5], ratio=2.5, size=5)
  np.testing.assert_allclose(resized[0], window.reshape(2, 5, 2, 5, 2).mean(axis=(2, 4)),
                             rtol=1e-6)
  with pytest.raises(BadValue, match="cell_ids: cell 7 has no pixels"):
    fields.cell_regions(image, mask, [7])


@pytest.mark.parametrize("call,field", [
    (lambda: fields.cell_regions(*_one_cell(), [5], ratio=0), "ratio"),
    (lambda: fields.cell_regions(*_one_cell(), [5], ratio=float("nan")), "ratio"),
    (lambda: fields.cell_regions(*_one_cell(), [5], cap=0), "cap"),
    (lambda: fields.cell_regions(*_one_cell(), [5], size=0), "size"),
    (lambda: fields.cell_regions(_one_cell()[0], np.zeros((3, 3)), [5]), "mask"),
    (lambda: fields.tiles(_image(1, 4, 4), 4, overlap=1.0), "overlap"),
    (lambda: fields.tiles(_image(1, 4, 4), 4, overlap=-0.1), "overlap"),
    (lambda: fields.tiles(_image(1, 4, 4), size=0), "size"),
    (lambda: fields.rescale(np.zeros((4, 4)), 2), "image"),
    (lambda: fields.rescale(_image(1, 4, 4), 2.5), "size"),
])
def test_bad_arguments_name_themselves(call, field):
  with pytest.raises(BadValue, match=f"^{field}: .*expected"):
    call()


# ---------------------------------------------------------------- embeddings


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A store of square cells (40 x 40 and 30 x 40 FOVs) and Microsnoop's embedder: a random
  2-member masked U-Net (widths 4, 8) on 16 px one-channel inputs, per channel."""
  store = square_cells_store(tmp_path_factory.mktemp("f") / "store",
                             fov_shapes=((40, 40), (30, 40)))
  spec = {"name": "masked_unet", "widths": (4, 8), "conv_impl": "xla"}
  trained = Trained(model=models.build(spec), variables=None, classes=("none",),
                    channels=store.meta.channels, input_size=16, crop_size=20,
                    normalize="none", mesh=make_mesh(1, -1), spec=spec, masks=False,
                    policy=policy_lib.resolve(conv_impl="xla", predict_dtype="float32"))
  trained = embed_lib.random_like(trained, jax.random.key(0), in_channels=1, members=2)
  return store, embed_lib.embedder(trained, store, ("embedding",), per_channel=True)


def test_arrays_embed_as_the_store_crops_they_equal(setup):
  store, e = setup
  assert len(e.names) == 3 * 8
  rows, want = next(embed_lib.embed_store(e, store, batch_size=16, threads=2))
  crops = CropSource(store, 20).read(rows[:20])["crop"][:, :3]  # the markers, 20 px
  got = fields.embed_arrays(e, crops, batch_size=16)
  np.testing.assert_allclose(got, want[:20], rtol=1e-5, atol=1e-6)
  assert fields.embed_arrays(e, crops[:0]).shape == (0, 24)


def test_a_fov_is_the_mean_of_its_parts(setup):
  store, e = setup
  names, tile = fields.fov_embeddings(e, store, "tile", fovs=("fov1", "fov0"), batch_size=8)
  _, scaled = fields.fov_embeddings(e, store, "rescale", batch_size=8)
  _, region = fields.fov_embeddings(e, store, "cell_region", ratio=2.0, cap=12, batch_size=8)
  rows, cells = fields.cell_region_embeddings(e, store, ratio=2.0, cap=12, batch_size=8)
  assert names == ("fov1", "fov0") and tile.shape == scaled.shape == region.shape == (2, 24)
  assert rows.tolist() == list(range(len(store.cells)))
  fov = store.cells.fov.to_numpy()
  for f in (0, 1):
    image, mask = store.read_fov(f)
    parts, _ = fields.tiles(image, 16, 0.1)
    assert len(parts) == (9 if f == 0 else 6)  # origins 0, 14, 24 (and 0, 14 over 30 rows)
    np.testing.assert_allclose(tile[1 - f], fields.embed_arrays(e, parts).mean(0), atol=1e-6)
    np.testing.assert_allclose(scaled[f], fields.embed_arrays(e, fields.rescale(image, 16)[None])[0],
                               atol=1e-6)
    ids = store.cells.cell_id.to_numpy()[fov == f]
    own = fields.embed_arrays(e, fields.cell_regions(image, mask, ids, ratio=2.0, cap=12, size=16))
    np.testing.assert_allclose(cells[fov == f], own, atol=1e-6)
    np.testing.assert_allclose(region[f], own.mean(0), atol=1e-6)
  some = np.array([30, 2, 40])  # in any order, across FOVs
  rows, got = fields.cell_region_embeddings(e, store, some, ratio=2.0, cap=12)
  assert rows.tolist() == some.tolist()
  np.testing.assert_allclose(got, cells[some], atol=1e-6)
  with pytest.raises(BadValue, match="mode: 'crop'"):
    fields.fov_embeddings(e, store, "crop")
  with pytest.raises(BadValue, match="fovs: unknown FOVs \\['fov7'\\]"):
    fields.fov_embeddings(e, store, "rescale", fovs=("fov7",))


# ---------------------------------------------------------------- batch experiments
