r"""Microsnoop's masked U-Net: pretraining step and embedding throughput against PyTorch's, one run.

  .venv/bin/python benchmarks/bench_unet.py [--quick] [--profile DIR] [--out FILE]
      [--parts one,ensemble] [--variants im2col_f32,...] [--members 10]
      [--sizes 224,64] [--batches 8,32] [--ensemble-sizes 64]

The network is `cellrep.models.masked_autoencoder` at its defaults (Cellpose's residual U-Net,
widths 32/64/128/256, style on, one channel: 6,600,453 parameters), on one-channel images of
`--sizes` pixels (224: Microsnoop's; 64: issue 17's runlocal size -- configs/microsnoop.py's
runlocal now trains on 32 px), each with its own batch per network (`--batches`: 8 at 224,
32 at 64, runlocal's batch). Two tasks:

  train  the real ensemble train step (`cellrep.train.ensemble.make_train_step`, strategy
         ``auto``, the real `MemberStep`): a fresh patch mask per example and member (25% of
         the 16 px patches zero-filled, the model's ``mask`` RNG stream), forward with
         train-mode BatchNorm, `cellrep.train.objectives.MaskedReconstruction` (MSE on the
         hidden pixels), backward, optax Adam (lr 1e-3)
  embed  `cellrep.infer.embed.make_embed_fn` with layers ("embedding",) (on a CPU lax.map
         over members one at a time): the encoder to the L2-normalised mean of its deepest
         map, inference-mode BatchNorm, no masking, [M, batch, 256] (XLA drops the decoder,
         whose output nothing reads)

cellrep variants (`VARIANTS`): convolutions ``xla`` (lax.conv_general_dilated), ``im2col``
(cellrep.ops.conv: matrix products of the shifted views) or ``auto`` (the backend policy's
choice, `resolve_conv_impl`: on a CPU im2col to train at these batches, Winograd to embed in
float32), each in float32 and bfloat16 (bf16 products accumulating in float32, float32
parameters). An ``auto`` variant whose lowered program is that of the implementation it
resolves to is not compiled or timed again (``same_program_as``).

PyTorch (`torch_ref.unet`, the `bench` extra): the same network written with Cellpose's
modules (resdown / resup / batchconvstyle; tests/test_masked_autoencoder_torch.py checks its
outputs and gradients against cellrep's with the same weights), channels_last, all cores;
float32 (``torch``) and under bf16 autocast (``torch_bf16``); the same masking (a fresh mask
per example each step), masked MSE, Adam; embed: eval(), inference_mode, the encoder. An
ensemble of M is M networks one after the other. Both sides get the same host images
([batch, 1, S, S] float32 in [0, 1), what per-image percentile normalisation gives);
cellrep's as NHWC. ``vs_torch`` per variant = PyTorch float32's time / the variant's (> 1:
cellrep faster).

Parts (`PARTS`), each its own interleaved rounds, all written to one JSON file
(results/unet.json):

  one       both tasks, one network, every size: every variant and PyTorch, with the jitted
            matmul references (bench_peak.py) in the same rounds. Unlike EfficientNet's
            depthwise layers, this network's dense convolutions are XLA:CPU's fast path: on
            this CPU one network's xla step ran ~1.3x its im2col one (64 px, batch 8)
  ensemble  both tasks, `--members` networks pretrained in one program, at `--ensemble-sizes`
            (default 64: ten networks at 224 take minutes a step on 2 cores): im2col and auto
            variants (``--variants`` replaces them) and PyTorch (M networks in a loop). xla
            variants are not timed by default: vmapped over members their convolutions
            become grouped ones, XLA:CPU's slow path (3 members, 64 px, batch 8: 8 s a step
            against im2col's 3.5 s), and a lax.map over one member at a time took 140 s

Model FLOPs (per network), by XLA's cost analysis with XLA convolutions, float32: embed, the
one-network embed program; train, 3 x one network's train-mode forward pass and loss (the
backward pass's two products per forward one). GFLOP/s of every row, PyTorch's included, =
M x model FLOPs / time; MFU = that / the jitted matmul's GFLOP/s in the row's dtype measured
in part ``one``'s rounds (report.py divides by the larger of that and bench_peak's).

Duration: the default run takes ~25-35 min on 2 idle cores (part one ~12 min, ensemble ~12;
``part_s`` in the JSON) -- an estimate, not a measurement: compile times and step rates from
smoke runs at small shapes on a loaded machine, scaled by the default shapes' FLOPs (one
network's pretrain step: ~740 GFLOP at 224 px, batch 8; ~230 at 64 px, batch 32). --quick
took 8 min with 2 cores' worth of other work on the machine (compiles of the same programs
at tiny shapes).
PyTorch's OpenMP threads wait for each other at every operation: with other work on the CPU
its steps slow several times over, XLA's far less; time vs_torch on an otherwise idle machine.
"""

from __future__ import annotations

import time

import benchlib
import convnet_cases
import torch_ref
from convnet_cases import build_cases, model_flops

# name: (conv_impl, dtype)
VARIANTS = {
    "im2col_f32": ("im2col", "float32"),
    "auto_f32": ("auto", "float32"),
    "im2col_bf16": ("im2col", "bfloat16"),
    "auto_bf16": ("auto", "bfloat16"),
    "xla_f32": ("xla", "float32"),
    "xla_bf16": ("xla", "bfloat16"),
}
PARTS = ("one", "ensemble")
TASKS = ("train", "embed")
CHANNELS = 1
LAYER = "embedding"
LR = 1e-3
REFERENCE_N = 2048
# (sizes, batches, ensemble sizes) by default and with --quick.
DEFAULT = ((224, 64), (8, 32), (64,))
QUICK = ((32,), (2,), (32,))


def host_batch(batch: int, size: int, seed: int = 0):
  """[batch, 1, size, size] float32 images in [0, 1)."""
  import numpy as np
  return np.random.default_rng(seed).random((batch, CHANNELS, size, size), dtype=np.float32)


def get_model(conv_impl: str, dtype: str):
  from cellrep import models
  return models.build({"name": "masked_unet"}, conv_impl=conv_impl, dtype=dtype)


class Builder(convnet_cases.Builder):
  """The masked U-Net's cases of one (members, batch, size): `case("train", variant)` and
  `case("embed", variant)` (`convnet_cases.Builder`); train masks are drawn from the state's
  step: fresh ones every call."""

  variants, infer_task, layer, channels = VARIANTS, "embed", LAYER, CHANNELS

  def model(self, conv_impl: str, dtype: str):
    return get_model(conv_impl, dtype)

  def optimizer(self):
    import optax
    return optax.adam(LR)

  def host_data(self, batch: int, size: int) -> dict:
    import numpy as np
    return {"crop": np.ascontiguousarray(host_batch(batch, size).transpose(0, 2, 3, 1))}

  def member_step(self, conv_impl: str, dtype: str):
    from cellrep.train.ensemble import MemberStep
    from cellrep.train.objectives import MaskedReconstruction
    return MemberStep(get_model(conv_impl, dtype), self.tx, lambda key, crop: crop,
                      MaskedReconstruction())


def torch_cases(task: str, members: int, batch: int, size: int) -> dict:
  """{"torch": (run, info), "torch_bf16": ...} of `task`, {} without torch."""
  images = host_batch(batch, size)
  out = {}
  for key, dtype in torch_ref.CASES.items():
    if task == "train":
      case = torch_ref.unet_train_case(images, dtype, members, LR)
    else:
      case = torch_ref.unet_embed_case(images, dtype, members)
    if case:
      out[key] = case
  return out


def rows(task, members, batch, size, cases, tcases, timing, flops) -> dict:
  """The JSON of one (task, size, members): every variant's and PyTorch's timing and rate."""
  out = {"task": task, "members": members, "batch": batch, "size": size, "model_flops": flops,
         "variants": {}}

  def rate(info, t):
    s = t["median_wall_s"]
    return dict(info, **t, ms=1e3 * s, gflops=members * flops / s / 1e9,
                member_images_per_s=members * batch / s)

  for key, (_, info) in tcases.items():
    out[key] = rate(info, timing[key])
  for variant, (_, info, _) in cases.items():
    out["variants"][variant] = rate(info, timing[variant])
  return out


def finish(cases: list, refs: dict) -> None:
  """`convnet_cases.finish`, PyTorch of another part's with the same task, size, batch and
  members where a part has none."""
  convnet_cases.finish(cases, refs, ("task", "members", "size", "batch"))


def show(r: dict) -> None:
  head = f"  {r['task']:5s} {r['size']:3d} px x{r['members']:<2d}"
  for name, v in r["variants"].items():
    same = f" (= {v['same_program_as']})" if "same_program_as" in v else ""
    vs = f"  vs PyTorch {v['vs_torch']:.2f}x" if "vs_torch" in v else ""
    print(f"{head} {name:12s} {v['ms']:9.1f} ms  {v['gflops']:6.1f} GFLOP/s  "
          f"MFU {100 * v['mfu']:4.1f}%{vs}{same}", flush=True)
  for key in ("torch", "torch_bf16"):
    if key in r:
      print(f"{head} {key:12s} {r[key]['ms']:9.1f} ms  {r[key]['gflops']:6.1f} GFLOP/s  "
            f"MFU {100 * r[key]['mfu']:4.1f}%", flush=True)


def measure_part(args, part: str, members: int, shapes, variants, rounds: int, warmup: int,
                 with_torch: bool, with_references: bool, known_refs: dict | None = None
                 ) -> tuple[list, dict]:
  """The (task, size, members) results of one part, timed in one interleaved set of rounds
  over all its shapes [(size, batch)], and the matmul references measured in them ({} without;
  `known_refs`, an earlier part's, price its MFU then)."""
  from bench_peak import reference_cases, reference_gflops

  print(f"== {part}: {members} network(s), {', '.join(f'{s} px batch {b}' for s, b in shapes)}"
        f": {', '.join(variants)}", flush=True)
  built, flops, tbuilt, timed = {}, {}, {}, {}
  for size, batch in shapes:
    builder = Builder(members, batch, size)
    for task in TASKS:
      key = (task, size)
      built[key] = build_cases(builder, task, variants)
      flops[key] = model_flops(builder, task)
      tbuilt[key] = torch_cases(task, members, batch, size) if with_torch else {}
      timed.update({f"{task}/{size}/{v}": run for v, (run, info, _) in built[key].items()
                    if "same_program_as" not in info})
      timed.update({f"{task}/{size}/{k}": run for k, (run, _) in tbuilt[key].items()})
  ref_flops = {}
  if with_references:
    ref_cases, ref_flops = reference_cases(("float32", "bfloat16"), REFERENCE_N)
    timed.update(ref_cases)
  timing = benchlib.interleave(timed, rounds, warmup=warmup)
  refs, ref_times = reference_gflops(timing, ref_flops)
  results = []
  for size, batch in shapes:
    for task in TASKS:
      key = (task, size)
      t = {v: timing[f"{task}/{size}/{info.get('same_program_as', v)}"]
           for v, (_, info, _) in built[key].items()}
      t.update({k: timing[f"{task}/{size}/{k}"] for k in tbuilt[key]})
      r = rows(task, members, batch, size, built[key], tbuilt[key], t, flops[key])
      r["part"], r["rounds"], r["warmup"] = part, rounds, warmup
      results.append(r)
      for v, (run, info, compiled) in built[key].items():
        if "same_program_as" not in info:
          benchlib.profile(args.profile, f"{part}_{task}_{size}_x{members}_{v}", run, compiled)
  finish(results, refs or known_refs or _nan_refs())
  for r in results:
    show(r)
  print(f"  load {benchlib.load()}", flush=True)
  return results, ({"reference_gflops": refs, "reference_times": ref_times} if refs else {})


_nan_refs = convnet_cases.nan_refs


_done = convnet_cases.done


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in text.split(",") if x)


def main():
  p = benchlib.parser(__doc__, "unet")
  p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated of {','.join(PARTS)}")
  p.add_argument("--variants", default="",
                 help=f"replace the parts' cellrep variants, of {','.join(VARIANTS)}")
  p.add_argument("--members", type=int, default=0, help="the ensemble's networks (default 10)")
  p.add_argument("--sizes", default="", help="image sides in pixels (default 224,64)")
  p.add_argument("--batches", default="", help="batch per network, one per size (default 8,32)")
  p.add_argument("--ensemble-sizes", default="",
                 help="the sizes (of --sizes) part ensemble runs (default 64)")
  args = p.parse_args()
  parts = args.parts.split(",")
  chosen = args.variants.split(",") if args.variants else None
  unknown = sorted(set(parts) - set(PARTS)) + sorted(set(chosen or ()) - set(VARIANTS))
  if unknown:
    p.error(f"unknown part or variant {', '.join(unknown)}")
  sizes, batches, ensemble_sizes = QUICK if args.quick else DEFAULT
  sizes = _ints(args.sizes) or sizes
  batches = _ints(args.batches) or (batches if len(batches) == len(sizes) else batches[-1:] * len(sizes))
  ensemble_sizes = _ints(args.ensemble_sizes) or tuple(s for s in ensemble_sizes if s in sizes) or sizes[-1:]
  if len(batches) != len(sizes) or set(ensemble_sizes) - set(sizes):
    p.error("--batches needs one batch per size; --ensemble-sizes, sizes of --sizes")
  bad = [s for s in sizes if s % 16]
  if bad:
    p.error(f"sizes {bad}: 16 px patches must tile the images (and 3 pools halve them)")
  shapes = tuple(zip(sizes, batches))
  args.members = args.members or (2 if args.quick else 10)
  benchlib.setup_jax()
  with_torch = torch_ref.available()

  def pick(*names):
    return [v for v in (chosen or VARIANTS) if v in names]

  fast = pick("im2col_f32", "auto_f32", "im2col_bf16", "auto_bf16")
  result = benchlib.header("unet", args)
  result.update({"model": "masked_unet", "widths": [32, 64, 128, 256], "channels": CHANNELS,
                 "shapes": [{"size": s, "batch": b} for s, b in shapes],
                 "ensemble_sizes": list(ensemble_sizes), "members": args.members,
                 "layer": LAYER, "optimizer": f"adam(lr={LR})",
                 "mask": "0.25 of 16 px patches, zero-filled, fresh per example and step",
                 "variants": {v: {"conv_impl": c, "dtype": d} for v, (c, d) in VARIANTS.items()},
                 "cases": []})
  plans = {  # part: (networks, shapes, variants, rounds, warm-up rounds, PyTorch and references)
      "one": (1, shapes, pick(*VARIANTS), args.repeats or (1 if args.quick else 3), 1, True),
      "ensemble": (args.members, tuple((s, b) for s, b in shapes if s in ensemble_sizes),
                   chosen or fast, args.repeats or (1 if args.quick else 2), 1, True),
  }
  result["part_s"] = {}  # each part's wall seconds: building, compiling and timing
  start = time.perf_counter()
  # one first: its xla_f32 programs give the model FLOPs every part uses.
  for part in PARTS:
    members, part_shapes, variants, rounds, warmup, full = plans[part]
    if part not in parts or not variants:
      continue
    t = time.perf_counter()
    cases, refs = measure_part(args, part, members, part_shapes, variants, rounds, warmup,
                               full and with_torch, full and "reference_gflops" not in result,
                               result.get("reference_gflops"))
    result.update(refs)
    result["cases"] += cases
    finish(result["cases"], result.get("reference_gflops", _nan_refs()))
    _done(result, part, t)
    benchlib.write(args.out, result)
  result["total_s"] = time.perf_counter() - start
  result["load_average_end"] = benchlib.load()
  benchlib.write(args.out, result)


if __name__ == "__main__":
  main()
