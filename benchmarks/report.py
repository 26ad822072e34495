r"""The performance tables of docs/performance.md, from the benchmark JSON files.

  .venv/bin/python benchmarks/report.py                 # print the markdown
  .venv/bin/python benchmarks/report.py --docs          # and write it into docs/performance.md
  .venv/bin/python benchmarks/report.py --docs FILE --results DIR

Reads the JSON files of benchmarks/results/ that exist: ensemble.json and one
ensemble_<group>.json per further case group of bench_ensemble.py (`GROUPS`), peak.json,
inference.json and inference_<batch>.json, efficientnet.json, unet.json, hostmem.json,
pipeline.json, profiling.json and profiling_*.json (bench_profiling.py runs with other
sizes: their rows replace profiling.json's where they measured the reference). With --docs
the tables replace what lies between the file's `<!-- bench:begin -->` and
`<!-- bench:end -->` lines, so `make bench` leaves docs/performance.md with the numbers it
measured.

MFU in the tables divides by the larger of the matmul reference timed in the
benchmark's own rounds and the quiet one of `bench_peak.py`: a reference round
slowed by other work would otherwise inflate the utilisation.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import bench_ensemble
import benchlib

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
DOCS = benchlib.ROOT / "docs" / "performance.md"


def _load(results: pathlib.Path, name: str) -> dict | None:
  path = results / f"{name}.json"
  return json.loads(path.read_text()) if path.is_file() else None


def _machine(r: dict) -> str:
  m = r["machine"]
  end = r.get("load_average_end")
  isa = f", {' '.join(m['cpu_isa'])}" if m.get("cpu_isa") else ""
  return (f"{m.get('cpu')} ({m.get('cores')} cores{isa}, {_number(m.get('memory_gib'))} GiB), jax "
          f"{m.get('jax')}{', torch ' + m['torch'] if 'torch' in m else ''}; {r['started']}, load "
          f"average {r['load_average_start'][0]:.1f} at the start, "
          f"{_number(end[0]) if end else '?'} at the end")


def _number(x) -> str:
  return f"{x:.1f}" if isinstance(x, float) else str(x)


def _mfu(gflops: float, run_reference: float, floor: float) -> float:
  return gflops / max(run_reference, floor)


def peak(r: dict) -> list[str]:
  ref = r["reference"]
  lines = ["| jitted n x n matmul | " + " | ".join(f"n = {n}" for n in ref["float32"]["by_size"])
           + " | reference |", "|---|" + "---|" * (len(ref["float32"]["by_size"]) + 1)]
  for dtype, x in ref.items():
    lines.append(f"| {dtype} GFLOP/s | " + " | ".join(f"{g:.0f}" for g in x["by_size"].values())
                 + f" | **{x['gflops']:.0f}** |")
  if r.get("datasheet"):
    lines.append(f"\nDatasheet peak of {r['datasheet']['device']}: {r['datasheet']['tflops']} TFLOP/s.")
  return lines


def ensemble(r: dict, floor: float = 0.0) -> list[str]:
  nan = float("nan")
  cases = r["cases"]
  # The variants this run measured (its "variants" lists every one the benchmark knows).
  names = [n for n in r["variants"] if any(n in c["variants"] for c in cases)]
  torch = [k for k in ("torch", "torch_bf16") if any(k in c for c in cases)]
  # bfloat16 variants other than auto also face PyTorch's bf16 step.
  bf16 = [n for n in names if n != "auto" and r["variants"][n].get("dtype") == "bfloat16"]
  ratios = []  # (header, value of a case)
  if any("vs_loop" in c for c in cases):
    ratios.append(("auto / loop", lambda c: c.get("vs_loop", {}).get("auto", nan)))
  if any("auto_vs_best_loop" in c for c in cases):
    ratios.append(("auto / best loop", lambda c: c.get("auto_vs_best_loop", nan)))
  if "torch" in torch:
    ratios.append(("auto / PyTorch", lambda c: c.get("vs_torch", {}).get("auto", nan)))
  if "torch_bf16" in torch:
    ratios.append(("auto / PyTorch bf16", lambda c: c.get("vs_torch_bf16", {}).get("auto", nan)))
    ratios += [(f"{n} / PyTorch bf16", lambda c, n=n: c.get("vs_torch_bf16", {}).get(n, nan))
               for n in bf16]
  torch_head = {"torch": "PyTorch", "torch_bf16": "PyTorch bf16"}
  head = names + [torch_head[k] for k in torch] + [h for h, _ in ratios]
  lines = ["| model | M | " + " | ".join(head) + " | MFU auto | compile auto (cold / cached) |",
           "|---|---|" + "---|" * (len(head) + 2)]
  for c in cases:
    v = c["variants"]
    cells = [f"{v[n]['member_samples_per_s']:.1f}" if n in v else "" for n in names]
    cells += [f"{c[k]['samples_per_s']:.1f}" if k in c else "" for k in torch]
    cells += [f"{fn(c):.2f}x" for _, fn in ratios]
    auto = v.get("auto", {})
    plan = f" ({auto['strategy']}" + (f", {auto['map_batch']}/chunk)" if auto.get("strategy") == "map"
                                      else ")") if auto else ""
    lines.append(
        f"| {c['model']} | {c['members']} | " + " | ".join(cells)
        + f" | {100 * _mfu(auto.get('gflops', nan), c['reference_f32_gflops'], floor):.0f}%{plan}"
        + f" | {auto.get('compile_s', nan):.0f} s / {auto.get('cached_compile_s', nan):.1f} s |")
  c0 = cases[0] if cases else {}
  lines.append(f"\nMember-samples/s (members x batch / step time), batch {c0.get('batch')}, input "
               f"{c0.get('input')}; MFU = model FLOPs / step time / jitted float32 matmul FLOP/s "
               f"(the larger of the one measured in the same rounds and bench_peak's {floor:.0f}).")
  if torch:
    shares = sorted(f"{100 * c['augment']['share_of_auto']:.0f}" for c in cases
                    if "share_of_auto" in c.get("augment", {}))
    span = "-".join(dict.fromkeys([shares[0], shares[-1]])) if shares else ""
    augment = (f" CellSighter's augmentation alone (every member's view) took {span}% of auto's "
               "step time." if shares else "")
    lines.append(f"\nPyTorch: torchvision's network of the same name (conv1 for "
                 f"{c0.get('input', [0])[-1]} channels), channels_last, Adam, forward + "
                 "cross-entropy + backward + step on the same batch, float32 and under bf16 "
                 "autocast, in the same rounds; its samples/s are one network's (batch / step "
                 "time), so auto / PyTorch compares per member-sample. cellrep's step also "
                 "augments on the device, PyTorch's does not." + augment)
  return lines


def inference(r: dict, floors: dict | None = None) -> list[str]:
  lines = ["| predictor | strategy / convs / dtype | cells/s | member-images/s | vs PyTorch"
           " | vs PyTorch bf16 | GFLOP/s | MFU |", "|---|---|---|---|---|---|---|---|"]
  nan = float("nan")
  floors = floors or {}
  refs = r.get("reference_gflops", {"float32": r.get("reference_f32_gflops", nan)})

  def reference(dtype):  # the larger of this run's and bench_peak's
    return max(refs.get(dtype, nan), floors.get(dtype, 0.0))

  def mfu(gflops, dtype):
    return 100 * gflops / reference(dtype)

  for name, v in r["variants"].items():
    strategy = v["strategy"] + (f" of {v['map_batch']}" if v["strategy"] == "map" else "")
    lines.append(f"| {name} | {strategy} / {v['conv_impl']} / {v['dtype']} | {v['cells_per_s']:.1f}"
                 f" | {v['member_images_per_s']:.1f} | {r.get('vs_torch', {}).get(name, nan):.2f}x"
                 f" | {r.get('vs_torch_bf16', {}).get(name, nan):.2f}x"
                 f" | {v.get('gflops', nan):.0f} | {mfu(v.get('gflops', nan), v['dtype']):.0f}% |")
  for key in ("torch", "torch_bf16"):
    if key not in r:
      continue
    t = r[key]
    dtype = t.get("dtype", "float32")
    how = "autocast bfloat16" if dtype == "bfloat16" else "float32"
    vs = {k: t["images_per_s"] / r[k]["images_per_s"] if k in r else nan
          for k in ("torch", "torch_bf16")}
    lines.append(f"| PyTorch torchvision {r['model']} | channels_last, inference_mode, {how} | "
                 f"{t['images_per_s']:.1f} | {t['images_per_s']:.1f} | {vs['torch']:.2f}x"
                 f" | {vs['torch_bf16']:.2f}x"
                 f" | {t.get('gflops', nan):.0f} | {mfu(t.get('gflops', nan), dtype):.0f}% |")
  lines.append(f"\n{r['members']} members of {r['model']}, batch {r['batch']}, crops {r['input']}; "
               "GFLOP/s from the model's FLOPs (XLA cost analysis of one member's forward pass), "
               f"MFU = that / the jitted matmul's GFLOP/s in the variant's dtype (float32 "
               f"{reference('float32'):.0f}, bfloat16 operands {reference('bfloat16'):.0f}: the"
               " larger of the one measured"
               " in the same rounds and bench_peak's); the multiplications Winograd saves still"
               " count, so its MFU is an effective rate.")
  return lines


def _convnet_rows(label: str, m: dict, members: int, order: list, mfu, torch_name: str,
                  images: bool = False) -> list[str]:
  """bench_efficientnet.py's and bench_unet.py's table rows of one merged (task, ..., members)
  `m`: its variants in `order`, then PyTorch's; `images` adds a member-images/s column."""
  nan = float("nan")
  lines = []
  for name in sorted(m["variants"], key=order.index):
    v = m["variants"][name]
    same = f" (= {v['same_program_as']})" if "same_program_as" in v else ""
    how = v["strategy"] + (f" of {v['map_batch']}" if v["strategy"] == "map" and
                           v.get("map_batch") else "")
    rate = f" {v['member_images_per_s']:.1f} |" if images else ""
    lines.append(f"| {label} | {name}{same} | {v['conv_impl']} / {v['dtype']}, {how} | "
                 f"{v['ms']:.0f} |{rate} {v.get('vs_torch', nan):.2f}x | {v['gflops']:.1f} | "
                 f"{mfu(v)} |")
  for key, how in (("torch", "float32"), ("torch_bf16", "bf16 autocast")):
    if key in m:
      t = m[key]
      loop = f", {members} in a loop" if members > 1 else ""
      threads = f", {t['torch_threads']} threads" if "torch_threads" in t else ""
      rate = f" {t['member_images_per_s']:.1f} |" if images else ""
      lines.append(f"| {label} | {torch_name} | channels_last, {how}{threads}{loop} | "
                   f"{t['ms']:.0f} |{rate} {m['torch']['median_wall_s'] / t['median_wall_s']:.2f}x | "
                   f"{t['gflops']:.1f} | {mfu(t)} |")
  return lines


EFFICIENTNET_TASKS = {"train": "train step", "features": "features (block6a, pooled)"}
DEPTHWISE_ROWS = {"xla": "XLA, feature_group_count",
                  "im2col": "cellrep im2col (views times taps, kernel gradient written out)",
                  "views_autodiff": "shifted views by autodiff (im2col before)",
                  "torch": "PyTorch float32", "torch_bf16": "PyTorch bf16 autocast"}


def efficientnet(r: dict, floors: dict | None = None) -> list[str]:
  """bench_efficientnet.py: one row per variant and PyTorch case of each (task, members), the
  parts of one (task, members) merged; then the depthwise calibration."""
  nan = float("nan")
  floors = floors or {}
  refs = r.get("reference_gflops", {})

  def mfu(row):
    reference = max(refs.get(row.get("dtype"), nan), floors.get(row.get("dtype"), 0.0))
    return f"{100 * row.get('gflops', nan) / reference:.0f}%"

  merged = {}
  for c in r["cases"]:
    m = merged.setdefault((c["task"], c["members"]), {"variants": {}})
    m["variants"].update(c["variants"])
    m.update({k: c[k] for k in ("torch", "torch_bf16") if k in c})
  order = list(r["variants"])
  lines = ["| task | M | implementation | convs / dtype | ms per step or batch | vs PyTorch f32 "
           "| GFLOP/s | MFU |", "|---|---|---|---|---:|---:|---:|---:|"]
  for (task, members), m in sorted(merged.items(),
                                   key=lambda kv: (list(EFFICIENTNET_TASKS).index(kv[0][0]),
                                                   kv[0][1])):
    label = f"{EFFICIENTNET_TASKS.get(task, task)} | {members}"
    lines += _convnet_rows(label, m, members, order, mfu, "PyTorch torchvision")
  flops = {c["task"]: c["model_flops"] for c in r["cases"]}
  per_network = ", ".join(f"{EFFICIENTNET_TASKS.get(t, t)} {f / 1e9:.3g}" for t, f in
                          sorted(flops.items(), key=lambda kv: list(EFFICIENTNET_TASKS).index(kv[0])))
  lines.append(f"\nBatch {r['batch']} per network, input {r['input']}, {r['classes']} classes; "
               "train: forward (train-mode BatchNorm, dropout and stochastic depth 0.2) + "
               "cross-entropy + backward + SGD-Nesterov; features: to `block6a_activation`, "
               "mean-pooled, inference mode. M networks: cellrep's one ensemble program (its "
               "members by `strategy`), PyTorch's M networks one after the other. vs PyTorch "
               "f32 = PyTorch float32's time / the row's (same task and M, same run). GFLOP/s "
               "= M x one network's FLOPs (XLA cost analysis, XLA convolutions: features, its "
               "program; train, 3 x its train-mode forward pass and loss) / time; MFU = "
               "that / the jitted matmul's GFLOP/s in the row's dtype (the larger of the one "
               "measured in the same rounds and bench_peak's). One network's GFLOP: "
               f"{per_network}. xla rows: one timed round.")
  d = r.get("depthwise")
  if d:
    lines += ["", f"| depthwise {d['kernel']}x{d['kernel']}, C = {d['channels']}, "
              f"{d['size']}x{d['size']}, batch {d['batch']} | forward ms | forward + backward "
              "ms | max relative error vs XLA |", "|---|---:|---:|---:|"]
    for name, c in d["cases"].items():
      err = d.get("max_relative_error_vs_xla", {}).get(name)
      lines.append(f"| {DEPTHWISE_ROWS.get(name, name)} | {c['forward']['ms']:.2f} | "
                   f"{c['forward_backward']['ms']:.2f} | "
                   + (f"{err:.1e}" if err is not None else "—") + " |")
    lines.append("\nForward + backward: the output and both gradients (input and kernel) for a "
                 "random cotangent, median of the rounds.")
  return lines


UNET_TASKS = {"train": "pretrain step", "embed": "embedding"}


def unet(r: dict, floors: dict | None = None) -> list[str]:
  """bench_unet.py: one row per variant and PyTorch case of each (task, size, members), the
  parts of one (task, size, members) merged."""
  nan = float("nan")
  floors = floors or {}
  refs = r.get("reference_gflops", {})

  def mfu(row):
    reference = max(refs.get(row.get("dtype"), nan), floors.get(row.get("dtype"), 0.0))
    return f"{100 * row.get('gflops', nan) / reference:.0f}%"

  merged = {}
  for c in r["cases"]:
    m = merged.setdefault((c["task"], c["size"], c["members"]), {"variants": {}, "batch": c["batch"]})
    m["variants"].update(c["variants"])
    m.update({k: c[k] for k in ("torch", "torch_bf16") if k in c})
  order = list(r["variants"])
  lines = ["| task | px, batch | M | implementation | convs / dtype | ms per step or batch "
           "| member-images/s | vs PyTorch f32 | GFLOP/s | MFU |",
           "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
  for (task, size, members), m in sorted(
      merged.items(), key=lambda kv: (list(UNET_TASKS).index(kv[0][0]), -kv[0][1], kv[0][2])):
    label = f"{UNET_TASKS.get(task, task)} | {size}, {m['batch']} | {members}"
    lines += _convnet_rows(label, m, members, order, mfu, "PyTorch (Cellpose's modules)",
                           images=True)
  flops = {(c["task"], c["size"], c["batch"]): c["model_flops"] for c in r["cases"]}
  per_network = ", ".join(f"{UNET_TASKS.get(t, t)} at {s} px, batch {b}: {f / 1e9:.3g}"
                          for (t, s, b), f in sorted(flops.items(), key=lambda kv: (
                              list(UNET_TASKS).index(kv[0][0]), -kv[0][1])))
  lines.append(f"\nMicrosnoop's masked U-Net (widths {'/'.join(map(str, r['widths']))}, "
               f"{r['channels']} channel); pretrain step: {r['mask']}, forward (train-mode "
               f"BatchNorm), MSE on the hidden pixels, backward, {r['optimizer']}; embedding: "
               "the encoder to the L2-normalised mean of its deepest map, inference mode. M "
               "networks: cellrep's one ensemble program (its members by `strategy`), "
               "PyTorch's M networks (the same network in Cellpose's modules, "
               "tests/test_masked_autoencoder_torch.py) one after the other. vs PyTorch f32 = "
               "PyTorch float32's time / the row's (same task, size and M, same run). GFLOP/s "
               "= M x one network's FLOPs (XLA cost analysis, XLA convolutions: embedding, its "
               "program; pretrain, 3 x its train-mode forward pass and loss) / time; MFU = "
               "that / the jitted matmul's GFLOP/s in the row's dtype (the larger of the one "
               "measured in the same rounds and bench_peak's). One network's GFLOP: "
               f"{per_network}.")
  return lines


def pipeline(r: dict) -> list[str]:
  best = {}
  for c in r["configs"]:
    key = (c["chunk"], c["fov_window"])
    if key not in best or c["crops_per_s"] > best[key]["crops_per_s"]:
      best[key] = c
  lines = ["| chunk | FOV-local order | best crops/s | threads, workers |", "|---|---|---|---|"]
  for (chunk, window), c in sorted(best.items()):
    order = f"{window} FOVs at a time" if window else "all cells shuffled"
    lines.append(f"| {chunk}^2 | {order} | {c['crops_per_s']:.0f} | {c['threads']}, {c['workers']} |")
  consumed = r.get("train_step_consumes_crops_per_s") or {}
  if consumed:
    lines.append("\nThe train step consumes (host crops/s): "
                 + "; ".join(f"{k}: {v:.1f}" for k, v in consumed.items()) + ".")
  lines.append(f"\n{r['fovs']} FOVs of {r['fov_size']}^2, {r['markers']} uint16 markers + 2 masks, "
               f"crops {r['crop']}^2, batches of {r['batch']}.")
  return lines


def hostmem(r: dict) -> list[str]:
  names = {"predict": "predictor, 1 member, batch 128", "train": "train step, 1 member, batch 32",
           "torch": "PyTorch ResNet-50, batch 128", "reference_matmul": "jitted 2048^2 matmul"}
  lines = ["| ResNet-50 program | s, reuse on | s, reuse off | speed-up (median of rounds) |",
           "|---|---|---|---|"]
  for k, ratio in r["speedup_median"].items():
    on = benchlib.median([run["medians_s"][k] for run in r["runs"]["on"]])
    off = benchlib.median([run["medians_s"][k] for run in r["runs"]["off"]])
    lines.append(f"| {names.get(k, k)} | {on:.3f} | {off:.3f} | {ratio:.2f}x |")
  faults = {name: benchlib.median([run["page_faults_per_round"] for run in runs])
            for name, runs in r["runs"].items()}
  lines.append(f"\nMinor page faults per timed round: {faults['on']:,.0f} with reuse, "
               f"{faults['off']:,.0f} without; {r['rounds']} rounds of one process each way.")
  return lines


MEMORY_RUNS = {"demo": "`make demo` (configs/demo.py)",
               "cellsighter": "configs/cellsighter.py:runlocal",
               "mibi47": "one {channels}-channel 1024^2 FOV, ResNet-18 x1/4, 3 members, {steps} steps"}


def memory(r: dict) -> list[str]:
  lines = ["| run | peak RSS, reuse on | peak RSS, `--nokeep_freed_memory` | wall s, on / off |",
           "|---|---:|---:|---:|"]
  bounded = ""
  for name, label in MEMORY_RUNS.items():
    case = r["cases"].get(name)
    if not case:
      continue
    runs = case.get("runs", case)
    on, off = runs["keep"], runs["nokeep"]
    lines.append(f"| {label.format(**case)} | {on['peak_rss_gib']:.2f} GiB | "
                 f"{off['peak_rss_gib']:.2f} GiB | {on['wall_s']:.0f} / {off['wall_s']:.0f} |")
    if "bounded" in runs:
      b = runs["bounded"]
      bounded = (f"\nThe {case['channels']}-channel run bounded (`--nokeep_freed_memory "
                 f"--config.ensemble.strategy=map`): {b['peak_rss_gib']:.2f} GiB, {b['wall_s']:.0f} s."
                 + (f" Its rows: {case['note']} ({case['started']})." if "note" in case else ""))
  if bounded:
    lines.append(bounded)
  stream = r["cases"].get("stream")
  if stream:
    stores = stream["stores"]
    lines.append(f"\nOne pass of the training pipeline over every cell of a store, read caches "
                 f"bounded to {stream['budget_mib']} MiB (`data.fov_cache_mb={stream['fov_cache_mb']}`, "
                 f"`data.tensorstore_cache_mb={stream['tensorstore_cache_mb']}` per array): "
                 + "; ".join(f"store {k} the budget ({v['store_mib']:.0f} MiB decoded, {v['fovs']} "
                             f"FOVs) peaks at {v['peak_rss_gib']:.2f} GiB" for k, v in stores.items())
                 + f" ({stream['peak_growth_5x_over_1x']:.2f}x).")
  return lines


PROFILING_CASES = {  # case: (row label, what it matches)
    "sphering_all": ("Sphering, fit on all wells", "pycytominer `normalize`"),
    "sphering_controls": ("Sphering, fit on control wells only", "pycytominer `normalize`"),
    "ap_activity": ("AP, replicates vs controls", "copairs"),
    "ap_same_moa": ("AP, same-MoA, well level", "copairs"),
    "map_activity": ("mAP p-values, null 10,000", "copairs"),
}


def profiling(runs: dict[str, dict]) -> list[str]:
  """One table of `bench_profiling.py` runs ({file name: result}, profiling.json first).

  A (case, wells) row of a later file replaces the earlier one where it measured the
  reference, so that every ratio is of one run (profiling_16000_reference.json: the
  references at 16,000 wells, beside a cellrep run of its own)."""
  rows, source = {}, {}
  for name, r in runs.items():
    for row in r["runs"]:
      key = (row["case"], row["wells"])
      if key not in rows or _reference(row) is not None:
        rows[key], source[key] = row, name
  order = {case: i for i, case in enumerate(PROFILING_CASES)}
  lines = ["| case | wells | cellrep | reference | ratio | cellrep peak RSS |",
           "|---|---:|---:|---:|---:|---:|"]
  seen = set()
  for case, wells in sorted(rows, key=lambda k: (order.get(k[0], len(order)), k[0], k[1])):
    row = rows[case, wells]
    label, peer = PROFILING_CASES.get(case, (case, ""))
    if case not in seen and peer:
      label += f" (vs {peer})"
    seen.add(case)
    ours, ref = row.get("cellrep", {}), _reference(row)
    lines.append(f"| {label} | {wells:,} | {_seconds(ours, 2)} | "
                 f"{_seconds(ref, 1) if ref is not None else 'not run'} | "
                 + (f"{row['speedup']:.0f}x" if "speedup" in row else "—")
                 + (f" | {ours['peak_rss_gib']:.2f} GiB |" if "peak_rss_gib" in ours
                    else " | — |"))
  first = next(iter(runs.values()))
  later = sorted({source[k] for k in rows if _reference(rows[k]) is not None} - {next(iter(runs))})
  alone = sorted({source[k] for k in rows if _reference(rows[k]) is None} - {next(iter(runs))})
  lines.append(f"\n{first.get('data', '')}; the same wells for both sides, one process per "
               "(case, size, implementation), cellrep the median of warm calls (compilation "
               "excluded), the reference timed once (or the median of --reference-repeats); "
               "ratio = reference / cellrep; peak RSS of the case's process."
               + "".join(f" Rows whose reference `{n}.json` measured are from that run."
                         for n in later)
               + "".join(f" Rows of `{n}.json` (cellrep alone) are from that run, on its machine."
                         for n in alone))
  return lines


def _reference(row: dict) -> dict | None:
  return next((row[k] for k in ("pycytominer", "copairs") if k in row), None)


def _seconds(r: dict, digits: int) -> str:
  if "median_s" in r:
    return f"{r['median_s']:.{digits}f} s"
  error = r.get("error", "—")
  return " ".join(error) if isinstance(error, list) else str(error)


def _numbered(results: pathlib.Path, stem: str) -> list[str]:
  """stem_<n>.json of a benchmark's further runs (inference_256), by n."""
  names = [n for n in _further(results, stem) if n[len(stem) + 1:].isdigit()]
  return sorted(names, key=lambda n: int(n[len(stem) + 1:]))


def _further(results: pathlib.Path, stem: str) -> list[str]:
  """stem_*.json: further runs of a benchmark (profiling_16000_reference), by name."""
  return sorted(p.stem for p in results.glob(f"{stem}_*.json"))


def markdown(results=benchlib.RESULTS) -> str:
  results = pathlib.Path(results)
  peak_r = _load(results, "peak")
  floors = ({dtype: x["gflops"] for dtype, x in peak_r["reference"].items()} if peak_r else {})
  floor = floors.get("float32", 0.0)
  # (title, the files of one table: the first must exist, table of {file name: result});
  # one table per ensemble group and per inference batch size.
  sections = []
  for group, g in bench_ensemble.GROUPS.items():
    name = "ensemble" if group == bench_ensemble.MAIN_GROUP else f"ensemble_{group}"
    sections.append((g.title, [name], lambda rs: ensemble(*rs.values(), floor)))
  sections.append(("Reference FLOP rate", ["peak"], lambda rs: peak(*rs.values())))
  for name in ["inference", *_numbered(results, "inference")]:
    sections.append((None, [name], lambda rs: inference(*rs.values(), floors)))
  sections.append(("EfficientNet-B0 (Cell Painting CNN)", ["efficientnet"],
                   lambda rs: efficientnet(*rs.values(), floors)))
  sections.append(("Microsnoop's masked U-Net (pretraining and embedding)", ["unet"],
                   lambda rs: unet(*rs.values(), floors)))
  sections += [("Host-memory reuse", ["hostmem"], lambda rs: hostmem(*rs.values())),
               ("Crop pipeline", ["pipeline"], lambda rs: pipeline(*rs.values())),
               ("Peak memory of runs", ["memory"], lambda rs: memory(*rs.values())),
               ("Profiling kernels", ["profiling", *_further(results, "profiling")], profiling)]
  parts = []
  for title, names, fn in sections:
    if _load(results, names[0]) is None:
      continue
    rs = {n: r for n in names if (r := _load(results, n)) is not None}
    first = next(iter(rs.values()))
    title = title or f"Ensemble inference, batch {first['batch']}"
    files = ", ".join(f"`benchmarks/results/{n}.json`" for n in rs)
    parts += [f"#### {title} ({files})", ""]
    parts += [line for r in rs.values() for line in (f"_{_machine(r)}._", "")]
    parts += [*fn(rs), ""]
  return "\n".join(parts)


def write_between_markers(path: pathlib.Path, text: str) -> None:
  """Replaces what lies between the file's BEGIN and END lines by text (temporary file, rename)."""
  doc = path.read_text()
  if BEGIN not in doc or END not in doc:
    raise SystemExit(f"{path}: no {BEGIN} ... {END} section to replace")
  head, rest = doc.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
  tmp.replace(path)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--docs", nargs="?", const=str(DOCS), default="", metavar="FILE",
                 help=f"also write the tables into FILE between its {BEGIN} and {END} lines "
                      f"(FILE omitted: {DOCS.relative_to(benchlib.ROOT)}); without --docs, "
                      "only print them")
  p.add_argument("--results", default=str(benchlib.RESULTS), help="folder of the JSON files")
  args = p.parse_args()
  text = markdown(args.results)
  print(text)
  if args.docs:
    write_between_markers(pathlib.Path(args.docs), text)
    print(f"updated {args.docs}")


if __name__ == "__main__":
  main()
