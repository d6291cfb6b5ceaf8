"""The XLA CPU flags lever: the train step under each flag set, each in a fresh process.

  python -m benchmarks.xla_flags [--rounds=3] [--sizes=demo,paper]

Prints, per flag set, the step time at each size, its ratio to the default flags measured
in the same run, and the loss after one step (a flag that changes the numerics shows here).
Flags the installed jaxlib does not know make that row fail, which is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

#: name -> XLA_FLAGS. Candidates read from the installed jaxlib's flag names.
FLAG_SETS: dict[str, str] = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn custom call": ("--xla_cpu_use_onednn=true "
                           "--xla_cpu_experimental_onednn_custom_call=true"),
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "fast math": "--xla_cpu_enable_fast_math=true",
    "vector width 512": "--xla_cpu_prefer_vector_width=512",
    "no eigen threads": "--xla_cpu_multi_thread_eigen=false",
    "concurrency scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
}

_WORKER = """
import json, sys
from benchmarks import step
width, batch, rounds = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
fn, state, data = step.jax_step(width, batch, devices=1)
_, metrics = fn(state, data)
loss = float(metrics["loss"])
t = step.time_jax(width, batch, rounds=rounds, number=2, devices=1)
print(json.dumps({**t, "loss": loss}))
"""


def main() -> None:
    from benchmarks.__main__ import SIZES

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="demo,paper")
    args = parser.parse_args()
    sizes = [s for s in SIZES if s[0] in args.sizes.split(",")]
    results: dict[str, dict[str, dict]] = {}
    for name, xla_flags in FLAG_SETS.items():
        results[name] = {}
        for size, width, batch in sizes:
            env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}
            proc = subprocess.run([sys.executable, "-c", _WORKER, str(width), str(batch),
                                   str(args.rounds)], env=env, capture_output=True, text=True)
            if proc.returncode:
                results[name][size] = {"error": proc.stderr.strip().splitlines()[-1][:200]}
            else:
                results[name][size] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = results[name][size]
            print(f"{name:24s} {size:6s} " + (f"{1e3 * r['min_s']:8.1f} ms  x"
                  f"{results['default'][size]['min_s'] / r['min_s']:.2f}  loss {r['loss']:.6f}"
                  if "min_s" in r else f"failed: {r['error']}"), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
