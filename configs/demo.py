r"""The demo: synthetic multiplexed tissue, a 10-member tiny ResNet ensemble, minutes on a laptop CPU.

  python -m cellrep.launch --config=configs/demo.py --workdir=workdir/demo

Generates 8 FOVs of densely packed cells of 8 classes (markers nuclear, membranous
or cytoplasmic; spillover from neighbours; Poisson counts) into WORKDIR/store,
trains on 6 FOVs, predicts the 2 held out, and writes the report. `make demo`
runs exactly this. Re-running resumes from the last checkpoint.
"""

from cellrep.tasks import classify


def get_config(arg=None):
  del arg
  c = classify.default_config()
  c.data.source = "synthetic"
  c.data.synthetic.update(seed=0, n_fovs=8, fov_size=256)
  c.data.val_fovs = "synth_006,synth_007"
  c.data.crop_size = 32   # cells are ~12 px across: the cell and a ring of neighbours
  c.data.input_size = 24
  c.model.update(name="resnet18", width=0.125, stem="small")
  c.ensemble.members = 10
  c.train.update(steps=200, batch_size=64, lr=3e-3, schedule="cosine", warmup_steps=20,
                 log_every=10, checkpoint_every=25)
  c.predict.batch_size = 256
  return c
