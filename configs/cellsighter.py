r"""CellSighter's published settings: 10 x ResNet-50 on 60x60 crops of K markers + 2 masks.

  python -m cellrep.launch --config=configs/cellsighter.py --workdir=workdir/cs \
      --config.data.store=workdir/mibi/store

Paper/code settings (KerenLab/CellSighter train.py, config.json): read window
128 px (crop_size), network input 60 px (crop_input_size), Adam lr 1e-3 decayed
x0.85 per epoch, batch 128, 50 epochs, class-balanced sampling, all augmentations,
mean of member probabilities, confidence = max probability.

Variants (`:arg`, comma-separated):
  runlocal          shrink for a laptop CPU: synthetic tissue, ResNet-18 x1/8, 3 members,
                    60 steps, batch 32 (a smoke run of the full path, not a result)
  members=N         ensemble size
  crop=N            network input size (the read window follows: 128/60 of it)
"""

from cellrep import config_util
from cellrep.tasks import classify


def get_config(arg=None):
  args = config_util.parse_arg(arg, runlocal=False, members=10, crop=60)
  c = classify.default_config()
  c.data.input_size = args.crop
  c.data.crop_size = max(args.crop, round(args.crop * 128 / 60))
  c.ensemble.members = args.members
  c.predict.cellsighter_csv = True
  if args.runlocal:
    c.data.source = "synthetic"
    c.data.synthetic.update(n_fovs=4, fov_size=192)
    c.model.update(name="resnet18", width=0.125, stem="small")
    c.ensemble.members = min(args.members, 3)
    c.data.input_size = min(args.crop, 32)
    c.data.crop_size = c.data.input_size + 8
    c.train.update(steps=60, batch_size=32, log_every=10, checkpoint_every=30)
  return c
