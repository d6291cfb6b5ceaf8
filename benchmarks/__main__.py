r"""One command for every speed figure: ``python -m benchmarks`` (or ``make bench``).

  python -m benchmarks --out=runs/bench                  # everything (~10 min on 2 cores)
  python -m benchmarks --sections=step,tgd --rounds=3    # a part
  python -m benchmarks --dtypes=float32,bfloat16 --sizes=demo,paper,paper-b256  # a GPU

Writes ``bench.json`` (every timing: min and median of the rounds, the machine, versions)
and ``bench.md`` (the table). PyTorch, scikit-learn and scikit-image comparisons need the
``bench`` extra (``pip install -e '.[bench]'``); without them those rows say so.

Sections: ``peak`` (4096^2 float32 matmul), ``step`` (train step, ours vs PyTorch, demo and
paper widths, with FLOP rates), ``tgd`` (plain / projected / paper step at demo width),
``kse`` (paper network, cold and warm, vs the scikit-learn loop), ``osem`` (vs
scikit-image), ``scaling`` (the demo step on 1 and 2 devices and on 2 processes, the
all-reduce alone: ``benchmarks/scaling.py``),
``launch`` (a one-step ``train.py``: imports, and the whole run with the persistent
compilation cache off, filling, and filled), ``train`` (steps/s of the demo config's
``train.py``, 600 steps, on 1 and 2 CPU devices, under each interpreter of ``--pythons``:
one per jax version; ``benchmarks/train_speed.py``).
"""

from __future__ import annotations

import argparse
import datetime
from typing import Any

SECTIONS = ("peak", "step", "tgd", "kse", "graph", "osem", "scaling", "launch", "train")


def _sizes() -> tuple[tuple[str, float, int], ...]:
    """(name, width multiplier, global batch) of the step sizes: the demo and paper config
    presets (the default two), and the paper's network at batches that keep a GPU busy."""
    from tgd_jax.pet import config

    demo, paper = config.train_config("demo"), config.train_config("paper")
    return (("demo", demo.model.width_multiplier, demo.batch_size),
            ("paper", paper.model.width_multiplier, paper.batch_size),
            ("paper-b256", paper.model.width_multiplier, 256),
            ("paper-b1024", paper.model.width_multiplier, 1024))


SIZES = _sizes()
DTYPES = ("float32", "bfloat16")


def run(sections: tuple[str, ...], rounds: int, sizes: tuple[str, ...] = ("demo", "paper"),
        dtypes: tuple[str, ...] = ("float32",), pythons: tuple[str, ...] = (),
        out: str = "runs/bench") -> dict[str, Any]:
    from benchmarks import step
    from benchmarks.timing import machine
    from tgd_jax.pet.models import PAPER_FEATURES, scaled_features

    result: dict[str, Any] = {"date": datetime.date.today().isoformat(), "machine": machine()}
    if "peak" in sections:
        result["peaks"] = {d: step.matmul_peak(rounds=rounds, dtype=d) for d in dtypes}
        result["peak"] = result["peaks"][dtypes[0]]
        for d, peak in result["peaks"].items():
            print(f"matmul peak {d}: {peak['gflops']:.0f} GFLOP/s", flush=True)
    if "step" in sections:
        rows = []
        for name, width, batch in (s for s in SIZES if s[0] in sizes):
            for dtype in dtypes:
                flops = step.train_flops(scaled_features(PAPER_FEATURES, width), batch, 32)
                ours = step.time_jax(width, batch, rounds=rounds, dtype=dtype)
                torch = step.time_torch(width, batch, rounds=rounds, dtype=dtype)
                peak = result.get("peaks", {}).get(dtype, {}).get("gflops")
                row = {"size": name, "width": width, "batch": batch, "dtype": dtype,
                       "train_flops": flops, "ours": ours, "torch": torch,
                       "ours_gflops": flops / ours["min_s"] / 1e9,
                       "torch_gflops": flops / torch["min_s"] / 1e9 if torch else None,
                       "speedup_vs_torch": torch["min_s"] / ours["min_s"] if torch else None,
                       "mfu": flops / ours["min_s"] / 1e9 / peak if peak else None}
                rows.append(row)
                print(f"step {name} {dtype}: ours {1e3 * ours['min_s']:.2f} ms"
                      + (f", PyTorch {1e3 * torch['min_s']:.2f} ms" if torch else ""),
                      flush=True)
        result["step"] = rows
    if "tgd" in sections:
        modes = step.time_modes(0.25, 16, rounds=2 * rounds)
        result["tgd"] = {**modes, **{f"{m}_overhead": modes[m]["min_s"] / modes["plain"][
            "min_s"] - 1 for m in ("projected", "paper")}}
        print(f"TGD overhead: projected {100 * result['tgd']['projected_overhead']:+.1f} %, "
              f"paper {100 * result['tgd']['paper_overhead']:+.1f} %", flush=True)
    if "kse" in sections:
        from benchmarks import kse_bench

        result["kse"] = kse_bench.measure(rounds=rounds)
        print(f"KSE warm {1e3 * result['kse']['warm']['min_s']:.0f} ms, cold "
              f"{result['kse']['cold']['first_call_s']:.2f} s", flush=True)
    if "graph" in sections:
        from benchmarks import graph_bench

        result["graph"] = graph_bench.measure(rounds=max(2, rounds // 2))
        for name, g in result["graph"].items():
            print(f"graph {name}: {g['layers']} layers, trace {1e3 * g['trace']['min_s']:.0f} "
                  f"ms, plan {1e3 * g['plan']['min_s']:.0f} ms", flush=True)
    if "osem" in sections:
        try:
            from benchmarks import osem_vs_skimage
        except ImportError as e:
            result["osem"] = {"skipped": str(e)}
        else:
            result["osem"] = osem_vs_skimage.measure(rounds=max(2, rounds // 2))
            print(f"OSEM {result['osem']['ratio']:.1f}x scikit-image", flush=True)
    if "scaling" in sections:
        from benchmarks import scaling

        result["scaling"] = scaling.measure(rounds)
        print("\n".join(scaling.table(result["scaling"])), flush=True)
    if "launch" in sections:
        from benchmarks import launch

        result["launch"] = launch.measure()
        print("launch: " + ", ".join(f"{k} {v:.1f}" for k, v in result["launch"].items()),
              flush=True)
    if "train" in sections:
        import sys
        from pathlib import Path

        from benchmarks import train_speed

        result["train"] = train_speed.run(list(pythons or (sys.executable,)), [1, 2], ["auto"],
                                          600, Path(out))
    return result


def table(r: dict[str, Any]) -> str:
    """The markdown summary of a :func:`run` result."""
    m = r["machine"]
    out = [f"Measured {r['date']} on {m['cpu']} ({m['cores']} cores, {m['platform']}, "
           f"jax {m['versions']['jax']}, torch {m['versions']['torch']}). Min of the "
           "timed rounds after warm-up; ratios from the same run.", ""]
    peaks = r.get("peaks") or ({"float32": r["peak"]} if "peak" in r else {})
    if peaks:
        out += ["Matmul peak (4096^2): " + ", ".join(
            f"{d} **{p['gflops']:.0f} GFLOP/s**" for d, p in peaks.items()) + ".", ""]
    if "step" in r:
        out += ["| train step | dtype | ours | PyTorch | ours / PyTorch speed | GFLOP/s ours / "
                "PyTorch | ours % of matmul peak (MFU) |", "|---|---|---|---|---|---|---|"]
        for row in r["step"]:
            torch = row["torch"]
            dtype = row.get("dtype", "float32")
            peak = peaks.get(dtype, {}).get("gflops")
            out.append(
                f"| {row['size']} (width {row['width']}, batch {row['batch']}, 32x32) | "
                f"{dtype} | {1e3 * row['ours']['min_s']:.2f} ms | "
                + (f"{1e3 * torch['min_s']:.2f} ms | **{row['speedup_vs_torch']:.2f}x** | "
                   f"{row['ours_gflops']:.0f} / {row['torch_gflops']:.0f} |" if torch else
                   f"- | - | {row['ours_gflops']:.0f} / - |")
                + (f" {100 * row['ours_gflops'] / peak:.0f} % |" if peak else " - |"))
        out.append("")
    if "tgd" in r:
        t = r["tgd"]
        out += [f"TGD overhead at demo width (step time vs plain {1e3 * t['plain']['min_s']:.1f}"
                f" ms): projected **{100 * t['projected_overhead']:+.1f} %**, paper "
                f"**{100 * t['paper_overhead']:+.1f} %**.", ""]
    if "kse" in r:
        k = r["kse"]
        sk = k["sklearn"]
        cached = k.get("cold_cached")
        out += [f"KSE of the paper network (7 layers): warm **{1e3 * k['warm']['min_s']:.0f} "
                f"ms**, cold {k['cold']['first_call_s']:.2f} s (first call in a fresh "
                "process, compilation included)"
                + (f", cold with the persistent compilation cache filled "
                   f"**{cached['first_call_s']:.2f} s**" if cached else "")
                + (f"; scikit-learn NearestNeighbors loop (density only) "
                   f"{1e3 * sk['min_s']:.0f} ms, so ours is **"
                   f"{sk['min_s'] / k['warm']['min_s']:.1f}x** warm." if sk else "."), ""]
        lay = k["largest_layer_s"]
        out += [f"Its largest layer (256 -> 256): KSE {1e3 * lay['kse_scores']:.0f} ms, of "
                f"which the density {1e3 * lay['kernel_density']:.0f} ms; XLA's top_k alone "
                f"on its 256 x 256 x 256 distances takes {1e3 * lay['top_k_of_distances']:.0f}"
                " ms.", ""]
    if "graph" in r:
        out += ["| channel graph (full width) | layers | maps read by several layers | "
                "parameters | trace | plan (KSE, masks) | KSE alone |",
                "|---|---|---|---|---|---|---|"]
        for name, g in r["graph"].items():
            out.append(f"| {name} | {g['layers']} | {g['multi_reader_maps']} | "
                       f"{g['params']:,} | {1e3 * g['trace']['min_s']:.0f} ms | "
                       f"{1e3 * g['plan']['min_s']:.0f} ms | {1e3 * g['kse']['min_s']:.0f} ms |")
        out.append("")
    if "osem" in r and "ratio" in r["osem"]:
        o = r["osem"]
        out += [f"OSEM ({o['slices']} slices, {o['iterations']} x {o['subsets']}): ours "
                f"{o['ours_slices_per_s']:.1f} slices/s, scikit-image "
                f"{o['skimage_slices_per_s']:.1f} slices/s: **{o['ratio']:.1f}x** (liver "
                f"mean {o['liver_mean_ours']:.3f} vs {o['liver_mean_skimage']:.3f}).", ""]
    if "launch" in r:
        la = r["launch"]
        out += [f"Launch: a one-step `train.py` (demo config) takes {la['cache_off_s']:.1f} s "
                f"without the compilation cache, {la['cache_filling_s']:.1f} s filling it and "
                f"**{la['cache_hit_s']:.1f} s** with it filled; the imports alone take "
                f"{la['imports_s']:.1f} s.", ""]
    if "train" in r:
        from benchmarks import train_speed

        out += ["Steps/s of the demo config's `train.py` (600 steps, fresh processes, the "
                "median of its progress records after the first):", "",
                train_speed.markdown(r["train"]), ""]
    if "scaling" in r:
        from benchmarks import scaling

        if "1 device" in r["scaling"]:
            out += [*scaling.table(r["scaling"]), ""]
        else:  # bench.json of an earlier release: host devices only
            out += ["| host devices (demo step) | step | speed-up |", "|---|---|---|"]
            out += [f"| {d} | {1e3 * t['min_s']:.1f} ms | {t['speedup']:.2f}x |"
                    for d, t in r["scaling"].items()]
            out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", default="demo,paper",
                        help=f"step sizes, from {[s[0] for s in SIZES]}")
    parser.add_argument("--dtypes", default="float32", help=f"step dtypes, from {DTYPES}")
    parser.add_argument("--pythons", default="", help="section train: comma-separated "
                        "interpreters with tgd_jax installed, one per jax version (default: "
                        "this one)")
    args = parser.parse_args()
    sections = tuple(s for s in args.sections.split(",") if s)
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {SECTIONS}")
    sizes = tuple(s for s in args.sizes.split(",") if s)
    dtypes = tuple(d for d in args.dtypes.split(",") if d)
    for given, known, what in ((sizes, [s[0] for s in SIZES], "size"), (dtypes, DTYPES, "dtype")):
        bad = sorted(set(given) - set(known))
        if bad or not given:
            parser.error(f"unknown or no {what}(s) {bad}; choose from {list(known)}")
    from tgd_jax.io import workdir

    out = workdir.check_writable(args.out)
    result = run(sections, args.rounds, sizes, dtypes,
                 tuple(p for p in args.pythons.split(",") if p), str(out))
    workdir.write_json(out / "bench.json", result)
    text = table(result)
    workdir.atomic_write_bytes(out / "bench.md", (text + "\n").encode())
    print(text)


if __name__ == "__main__":
    main()
