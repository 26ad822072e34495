r"""Per-cell embeddings of a trained model (or of a random one, the baseline) -> embeddings.parquet.

  python -m cellrep.launch --config=configs/embed.py --workdir=workdir/demo-embed \
      --config.model_dir=workdir/demo
  python -m cellrep.launch --config=configs/embed.py --workdir=workdir/demo-embed-random \
      --config.model_dir=workdir/demo --config.random_init=True
  python -m cellrep.launch --config=configs/embed.py --workdir=workdir/snoop-tile \
      --config.model_dir=workdir/microsnoop --config.embed.per_channel=True \
      --config.embed.layers=embedding --config.embed.mode=tile

Embeds every cell of the store the model trained on (or `data.store`): features at
`embed.layers` (default `pool`, the network's penultimate features), spatially
mean-pooled, the mean over members. `embed.per_channel=True` embeds each marker
alone through a one-channel model and concatenates them (Microsnoop's mode; with
`random_init=True`, or without `model_dir`). `embed.mode` picks Microsnoop's inputs:
`single_cell` crops, `cell_region` windows (a row per cell), `rescale`d FOVs or FOV
`tile`s (a row per FOV); `embed.batch_experiment=True` sphers the FOV rows per plate on the
controls and averages them per treatment (treatment_profiles.parquet; NSC / NSCB with
`embed.moa`). The per-cell table is read by `configs/profile_eval.py:level=cell` as it is
(cellrep/tasks/embed.py).
"""

from cellrep.tasks import embed


def get_config(arg=None):
  del arg
  return embed.default_config()
