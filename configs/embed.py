r"""Per-cell embeddings of a trained model (or of a random one, the baseline) -> embeddings.parquet.

  python -m cellrep.launch --config=configs/embed.py --workdir=workdir/demo-embed \
      --config.model_dir=workdir/demo
  python -m cellrep.launch --config=configs/embed.py --workdir=workdir/demo-embed-random \
      --config.model_dir=workdir/demo --config.random_init=True

Embeds every cell of the store the model trained on (or `data.store`): features at
`embed.layers` (default `pool`, the network's penultimate features), spatially
mean-pooled, the mean over members. `embed.per_channel=True` embeds each marker
alone through a one-channel model and concatenates them (Microsnoop's mode; with
`random_init=True`, or without `model_dir`). The table is read by
`configs/profile_eval.py:level=cell` as it is (cellrep/tasks/embed.py).
"""

from cellrep.tasks import embed


def get_config(arg=None):
  del arg
  return embed.default_config()
