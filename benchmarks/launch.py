"""What a command spends before it trains: imports, then compilation and data checks.

``train.py`` runs ONE step of the demo config on a small simulated dataset, three times in
fresh processes: with the persistent compilation cache off, filling an empty cache, and
with the cache filled (the case of every run after the first). The imports alone are timed
in a fourth process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _wall(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def measure() -> dict[str, Any]:
    # One CPU device: the launch and compile times of RESULTS.md are a 1-device program's.
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
           "TGD_CPU_DEVICES": os.environ.get("TGD_CPU_DEVICES", "1")}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run([sys.executable, "-m", "tgd_jax.sim", "--role=train", "--studies=2",
                        "--slices=4", f"--out={data}"], cwd=ROOT, check=True,
                       capture_output=True, env={**env, "TGD_COMPILATION_CACHE": "off"})
        imports = _wall([sys.executable, "-c", "import tgd_jax.pet.pipeline, "
                         "tgd_jax.pet.cli"], env)
        result: dict[str, Any] = {"imports_s": imports}
        cache = Path(tmp) / "cache"
        for name, setting in (("cache_off", "off"), ("cache_filling", str(cache)),
                              ("cache_hit", str(cache))):
            result[f"{name}_s"] = _wall(
                [sys.executable, "train.py", f"--workdir={Path(tmp) / name}",
                 "--config=configs/train.py:demo", f"--config.data.path={data}/train.h5",
                 "--config.num_steps=1", "--config.eval_batches=1"],
                {**env, "TGD_COMPILATION_CACHE": setting})
    return result
