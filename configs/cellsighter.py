r"""CellSighter's published settings: 10 x ResNet-50 on 60x60 crops of K markers + 2 masks.

  python -m cellrep.launch --config=configs/cellsighter.py --workdir=workdir/cs \
      --config.data.store=workdir/mibi/store
  python -m cellrep.launch --config=configs/cellsighter.py:from_json=PATH/config.json --workdir=workdir/cs
  python -m cellrep.launch --config=configs/cellsighter.py:runlocal --workdir=workdir/cs-local

Paper/code settings (KerenLab/CellSighter train.py, config.json): read window
128 px (crop_size), network input 60 px (crop_input_size), Adam lr 1e-3 decayed
x0.85 per epoch, batch 128, 50 epochs, class-balanced sampling, all augmentations,
mean of member probabilities, confidence = max probability. The `cellsighter`
task trains and predicts as `classify` does, then adds the paper's analyses:
XGBoost baseline, confidence analysis, saliency, simulations, learning curve,
transfer (cellrep/tasks/cellsighter.py).

Variants (`:arg`, comma-separated):
  runlocal          for a laptop CPU (~6 min on 2 cores): the demo's synthetic tissue and
                    ResNet-18 x1/8 with 3 members, every analysis on (simulations of CD8 T
                    cells with CD4, a learning curve over 50/100/250 cells per class,
                    transfer to a synthetic panel without Ki67)
  from_json=PATH    a CellSighter config.json: its data folder, FOV sets, crop sizes,
                    epochs, lr, blacklist, hierarchy_match, size_data, aug
  members=N         ensemble size
  crop=N            network input size (the read window follows: 128/60 of it)
"""

from cellrep import config_util
from cellrep.tasks import cellsighter, cellsighter_json


def get_config(arg=None):
  args = config_util.parse_arg(arg, runlocal=False, members=10, crop=60, from_json="")
  c = cellsighter.default_config()
  c.data.input_size = args.crop
  c.data.crop_size = max(args.crop, round(args.crop * 128 / 60))
  c.ensemble.members = args.members
  if args.from_json:
    cellsighter_json.apply(c, args.from_json)
  if args.runlocal:
    # The demo's tissue and network with 3 members; every analysis on, sized for a CPU.
    c.data.source = "synthetic"
    c.data.synthetic.update(n_fovs=6, fov_size=256)
    c.data.val_fovs = "synth_005"
    c.model.update(name="resnet18", width=0.125, stem="small")
    c.ensemble.members = min(args.members, 3)
    c.data.input_size = min(args.crop, 24)
    c.data.crop_size = c.data.input_size + 8
    c.train.update(steps=200, batch_size=64, lr=3e-3, schedule="cosine", warmup_steps=20,
                   log_every=10, checkpoint_every=50)
    c.simulate.update(class_a="CD8 T", marker_a="CD8", class_b="CD4 T", marker_b="CD4",
                      cells=100, repeats=2)
    c.learning_curve.update(enabled=True, sizes="50,100,250", repeats=2, members=1, steps=100)
    c.transfer.update(synthetic=True, drop_channels="Ki67")
  return c
