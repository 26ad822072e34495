r"""The README's performance tables, from the benchmark JSON files.

  .venv/bin/python benchmarks/report.py                      # print the markdown
  .venv/bin/python benchmarks/report.py --readme README.md   # and replace it in the README

Reads benchmarks/results/{peak,ensemble,inference,inference_256,pipeline}.json
(those that exist) and writes the tables between the README's `<!-- bench:begin -->` and
`<!-- bench:end -->` lines, so `make bench` leaves the README with the numbers
it measured.

MFU in the tables divides by the larger of the matmul reference timed in the
benchmark's own rounds and the quiet one of `bench_peak.py`: a reference round
slowed by other work would otherwise inflate the utilisation.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib

import benchlib

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def _load(results: pathlib.Path, name: str) -> dict | None:
  path = results / f"{name}.json"
  return json.loads(path.read_text()) if path.is_file() else None


def _machine(r: dict) -> str:
  m = r["machine"]
  return (f"{m.get('cpu')} ({m.get('cores')} cores, {m.get('memory_gib')} GiB), jax {m.get('jax')}"
          f"{', torch ' + m['torch'] if 'torch' in m else ''}; {r['started']}, load average "
          f"{r['load_average_start'][0]:.1f} at the start, {r.get('load_average_end', ['?'])[0]} "
          "at the end")


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
  # The variants this run measured (its "variants" lists every one the benchmark knows).
  names = [n for n in r["variants"] if any(n in c["variants"] for c in r["cases"])]
  lines = ["| model | M | " + " | ".join(names) + " | auto / loop | auto / best loop | MFU auto"
           " | compile auto (cold / cached) |",
           "|---|---|" + "---|" * (len(names) + 4)]
  for c in r["cases"]:
    v = c["variants"]
    cells = [f"{v[n]['member_samples_per_s']:.1f}" if n in v else "" for n in names]
    auto = v.get("auto", {})
    plan = f" ({auto['strategy']}" + (f", {auto['map_batch']}/chunk)" if auto.get("strategy") == "map"
                                      else ")") if auto else ""
    lines.append(
        f"| {c['model']} | {c['members']} | " + " | ".join(cells)
        + f" | {c.get('vs_loop', {}).get('auto', float('nan')):.2f}x"
        + f" | {c.get('auto_vs_best_loop', float('nan')):.2f}x"
        + f" | {100 * _mfu(auto.get('gflops', float('nan')), c['reference_f32_gflops'], floor):.0f}%{plan}"
        + f" | {auto.get('compile_s', float('nan')):.0f} s / {auto.get('cached_compile_s', float('nan')):.1f} s |")
  c0 = r["cases"][0] if r["cases"] else {}
  lines.append(f"\nMember-samples/s (members x batch / step time), batch {c0.get('batch')}, input "
               f"{c0.get('input')}; MFU = model FLOPs / step time / jitted float32 matmul FLOP/s "
               f"(the larger of the one measured in the same rounds and bench_peak's {floor:.0f}).")
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


def markdown(results=benchlib.RESULTS) -> str:
  parts = []
  loaded = {name: _load(pathlib.Path(results), name)
            for name in ("ensemble", "peak", "inference", "inference_256", "hostmem", "pipeline")}
  floors = ({dtype: x["gflops"] for dtype, x in loaded["peak"]["reference"].items()}
            if loaded["peak"] else {})
  floor = floors.get("float32", 0.0)
  for name, title, fn in (("ensemble", "Ensemble train step", functools.partial(ensemble, floor=floor)),
                          ("peak", "Reference FLOP rate", peak),
                          ("inference", "Ensemble inference", functools.partial(inference, floors=floors)),
                          ("inference_256", "Ensemble inference, batch 256",
                           functools.partial(inference, floors=floors)),
                          ("hostmem", "Host-memory reuse", hostmem),
                          ("pipeline", "Crop pipeline", pipeline)):
    r = loaded[name]
    if r is None:
      continue
    parts += [f"#### {title} (`benchmarks/results/{name}.json`)", "", f"_{_machine(r)}._", "",
              *fn(r), ""]
  return "\n".join(parts)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--readme", default="")
  p.add_argument("--results", default=str(benchlib.RESULTS), help="folder of the JSON files")
  args = p.parse_args()
  text = markdown(args.results)
  print(text)
  if args.readme:
    path = pathlib.Path(args.readme)
    readme = path.read_text()
    if BEGIN not in readme or END not in readme:
      raise SystemExit(f"{path}: no {BEGIN} ... {END} section to replace")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    print(f"updated {path}")


if __name__ == "__main__":
  main()
