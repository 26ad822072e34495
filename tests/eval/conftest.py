"""A small CNN ensemble trained once per test session on synthetic tissue, for property tests.

Four classes (Tumor, Epithelial, CD4 T, CD8 T): Tumor and Epithelial differ by
where beta-catenin sits (nucleus vs membrane), CD4 T and CD8 T by one membrane
marker, and the tissue carries neighbours' membrane patches. Trained by the
classify task itself; about 30 s on a 2-core CPU.
"""

from __future__ import annotations

import pytest

from cellrep.data.store import open_store
from cellrep.infer import trained as trained_lib
from cellrep.tasks import classify

HELD_OUT = "synth_003"


def small_synthetic_config(store_fovs: int = 4, fov_size: int = 160, steps: int = 120,
                           members: int = 2):
  c = classify.default_config()
  c.progress = False
  c.data.source = "synthetic"
  c.data.synthetic.update(seed=0, n_fovs=store_fovs, fov_size=fov_size, n_classes=4)
  c.data.val_fovs = HELD_OUT
  c.data.crop_size, c.data.input_size, c.data.threads = 32, 24, 4
  c.model.update(name="resnet18", width=0.125, stem="small")
  c.ensemble.members = members
  c.train.update(steps=steps, batch_size=32, lr=3e-3, schedule="cosine", warmup_steps=10,
                 log_every=50, checkpoint_every=1000)
  c.predict.batch_size = 128
  return c


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory):
  """(work directory, scalars) of the trained run; its store is workdir/store."""
  workdir = tmp_path_factory.mktemp("synthetic_run")
  scalars = classify.run(small_synthetic_config(), workdir)
  return workdir, scalars


@pytest.fixture(scope="session")
def synthetic_model(synthetic_run):
  """(Trained loaded back from the work directory, its store, the run's scalars)."""
  workdir, scalars = synthetic_run
  return trained_lib.load(workdir), open_store(workdir / "store"), scalars
