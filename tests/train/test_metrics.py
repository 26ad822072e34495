import math

from cellrep.train.metrics import MetricWriter, read_metrics


def test_jsonl_tensorboard_and_resume_drops_later_records(tmp_path):
  w = MetricWriter(tmp_path)
  for step in range(1, 6):
    w.write(step, {"train/loss": 1.0 / step, "train/cells": 3})
  w.write(6, {"train/loss": float("nan")})
  w.close()
  records = read_metrics(tmp_path)
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert math.isclose(records[1]["train/loss"], 0.5) and records[-1]["train/loss"] == "nan"
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  # Resuming from a checkpoint at step 3: what the interrupted run wrote after it goes.
  w = MetricWriter(tmp_path, resume_step=3)
  w.write(4, {"train/loss": 0.2})
  w.close()
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
  assert read_metrics(tmp_path)[-1]["train/loss"] == 0.2


def test_a_rerun_of_a_finished_run_keeps_one_evaluation(tmp_path):
  for _ in range(2):  # the run, then the same command again (resumes at its last step)
    w = MetricWriter(tmp_path, tensorboard=False, resume_step=4 if _ else None)
    if not _:
      w.write(4, {"train/loss": 0.5})
    w.write(4, {"eval/recall": 0.9})
    w.close()
  assert read_metrics(tmp_path) == [{"step": 4, "train/loss": 0.5}, {"step": 4, "eval/recall": 0.9}]
