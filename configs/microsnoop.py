r"""Microsnoop (Xun et al. 2024): a masked residual U-Net pretrained on one-channel images of
every channel of your stores, then frozen and used channel by channel.

  python -m cellrep.launch --config=configs/microsnoop.py --workdir=workdir/snoop \
      --config.data.stores=workdir/storeA/store,workdir/storeB/store \
      --config.probe.store=workdir/labelled/store
  python -m cellrep.launch --config=configs/microsnoop.py:runlocal --workdir=workdir/snoop-local

Paper settings: 224 px inputs, per-image 1st-99th percentile normalisation, 16 px patches
of which 25% are hidden (zeros), MSE on the hidden pixels, flips and 90° rotations, Adam;
embeddings the L2-normalised mean of the deepest encoder map, 256-d per channel. The
report compares kNN and linear probes of the pretrained encoder with a random one's on a
labelled probe store (default: synthetic tissue of FOVs the pool never saw). Embed any
store afterwards with configs/embed.py --config.model_dir=WORKDIR
--config.embed.per_channel=true --config.embed.layers=embedding.

Variants (`:arg`, comma-separated):
  runlocal    for a laptop CPU: 4 FOVs of synthetic tissue and the 22 channels of
              ../shared/data/mibi_fov8 pooled, 32 px inputs of 40 px crops, 8 px patches
              (16 px would leave 4 patches per image), a short pretraining, the probes on
              2 unseen synthetic FOVs, and a mask-ratio sweep of shorter runs
  members=N   ensemble size (default 1)
"""

import pathlib

from cellrep import config_util
from cellrep.tasks import pretrain

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def get_config(arg=None):
  args = config_util.parse_arg(arg, runlocal=False, members=1)
  c = pretrain.default_config()
  c.ensemble.members = args.members
  if args.runlocal:
    c.data.synthetic_fovs = 4
    c.data.synthetic.update(fov_size=256)
    c.data.tiff_folders = str(SHARED / "mibi_fov8")
    c.data.crop_size, c.data.input_size = 40, 32
    c.model.mask_patch = 8
    c.train.update(steps=400, batch_size=32, lr=2e-3, log_every=10, checkpoint_every=100)
    c.probe.update(synthetic_fovs=2, max_cells=800, cap=32)
    c.sweep.update(mask_ratios="0.1,0.5,0.75", steps=150)
  return c
