r"""Predict a store with a trained ensemble (the same panel or another one).

  python -m cellrep.launch --config=configs/predict.py --workdir=workdir/pred \
      --config.model_dir=workdir/cs --config.data.store=workdir/other/store

The store's channels are matched to the model's by name; missing ones are fed as
zeros (with a warning), and fewer than `transfer.min_overlap` of them is an error.
"""

from cellrep.tasks import predict


def get_config(arg=None):
  del arg
  return predict.default_config()
