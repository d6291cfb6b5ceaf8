"""reproduce.py: the job graph, the scheduler (order, parallelism, failure, resume), the
report's verdict rules, and the tiny preset end to end with its report checked against the
files it was written from (and the simulator's command checked on the datasets it made)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tgd_jax.io.errors import RunError, UsageError
from tgd_jax.pet import report
from tgd_jax.pet import reproduce as rp
from tgd_jax.pet.dataset import load_study, open_dataset

ROOT = Path(__file__).resolve().parent.parent


# --- the plan -------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(rp.PRESETS))
def test_plan_is_a_valid_graph_with_every_system(preset, tmp_path):
    jobs = rp.plan(preset, tmp_path)
    names = [j.name for j in jobs]
    assert len(set(names)) == len(names)
    position = {n: i for i, n in enumerate(names)}
    for job in jobs:
        assert all(position[d] < position[job.name] for d in job.deps), job.name
    seeds = rp.PRESETS[preset].seeds
    labels = [(j.system.label, j.system.seed) for j in jobs if j.system]
    for seed in seeds:  # the key comparison on every seed
        for label in ("v1-net", "v2-net", "FT-net", "TGD-net", "random mask"):
            assert (label, seed) in labels
    for label in ("full fine-tuning", "TGD-net, paper mode", "L1 mask", "TGD_N2N-net",
                  "TGD^2_N2N-net", "N2N, all weights"):
        assert (label, seeds[0]) in labels
    # every network is evaluated on v2, and v1-net's descendants on v1 (forgetting), in
    # its seed's evaluation job, which waits for it
    evaluated = {}
    for job in jobs:
        if job.name.startswith("eval-"):
            nets = [a.split("=")[1] for a in job.argv if a.startswith("--net=")]
            assert set(nets) <= set(job.deps), job.name
            version = job.name.rsplit("-", 1)[1]
            for net in nets:
                evaluated.setdefault(net, []).append((job.name, version))
    for job in jobs:
        if job.system:
            seed = job.system.seed
            v1 = job.system.label != "v2-net" and job.system.kind != "online"
            assert sorted(evaluated[job.name]) == sorted(
                [(f"eval-s{seed}-v2", "v2")] + ([(f"eval-s{seed}-v1", "v1")] if v1 else [])), \
                job.name
    # TGD^2 starts from TGD-net, TGD_N2N from v2-net
    by_name = {j.name: j for j in jobs}
    assert by_name["tgd2n2n"].system.start == f"tgdnet-s{seeds[0]}"
    assert by_name["tgdn2n"].system.start == f"v2net-s{seeds[0]}"


def test_a_model_choice_reaches_every_pretraining_and_nothing_else(tmp_path):
    plain = {job.name: job.argv for job in rp.plan("study", tmp_path)}
    unet = {job.name: job.argv for job in rp.plan("study", tmp_path, model="unet")}
    assert plain.keys() == unet.keys()
    for name, argv in unet.items():
        extra = [a for a in argv if a not in plain[name]]
        # pretraining picks the model; the rest take it from their starting checkpoint
        assert extra == (["--config.model.name=unet"] if name.startswith(("v1net", "v2net"))
                         else []), name
    with pytest.raises(UsageError, match="unknown model 'vit'"):
        rp.plan("demo", tmp_path, model="vit")


def test_a_preset_at_tiny_scale_keeps_its_jobs_and_seeds(tmp_path):
    full = rp.plan("gpu", tmp_path)
    tiny = rp.plan("gpu", tmp_path, tiny=True)
    assert [j.name for j in full] == [j.name for j in tiny]
    assert rp.PRESETS["gpu"].seeds == (0, 1) and rp.PRESETS["gpu"].config == ""  # full width
    argv = {j.name: " ".join(j.argv) for j in tiny}
    assert "--studies=2" in argv["sim-train"] and "--studies=21" not in argv["sim-train"]
    assert "configs/train.py:tiny" in argv["v1net-s1"]
    assert "--studies=21" in " ".join(next(j.argv for j in full if j.name == "sim-train"))


def test_unknown_preset_is_refused(tmp_path):
    with pytest.raises(UsageError, match="unknown preset"):
        rp.plan("huge", tmp_path)


# --- the scheduler --------------------------------------------------------------------------


def _job(name, out, deps=(), code=""):
    """A job that checks its dependencies' records exist, then logs its own start/end."""
    script = (
        "import json, sys, time, pathlib\n"
        f"out = pathlib.Path({str(out)!r})\n"
        f"for d in {list(deps)!r}:\n"
        "    assert (out / 'jobs' / f'{d}.json').exists(), d\n"
        f"with open(out / 'trace.txt', 'a') as f: f.write('start {name}\\n')\n"
        "time.sleep(0.3)\n"
        f"{code}\n"
        f"with open(out / 'trace.txt', 'a') as f: f.write('end {name}\\n')\n")
    return rp.Job(name, (sys.executable, "-c", script), deps=tuple(deps))


def test_run_respects_dependencies_and_runs_in_parallel(tmp_path):
    jobs = [_job("a", tmp_path), _job("b", tmp_path), _job("c", tmp_path, deps=("a", "b")),
            _job("d", tmp_path, deps=("c",))]
    records = rp.run(jobs, tmp_path, workers=2, log=lambda m: None)
    assert set(records) == {"a", "b", "c", "d"}
    trace = (tmp_path / "trace.txt").read_text().split("\n")
    # a and b overlapped (both started before either ended); c after both, d after c
    assert trace.index("start b") < trace.index("end a") or \
        trace.index("start a") < trace.index("end b")
    assert trace.index("start c") > max(trace.index("end a"), trace.index("end b"))
    assert trace.index("start d") > trace.index("end c")
    for name in "abcd":
        record = json.loads((tmp_path / "jobs" / f"{name}.json").read_text())
        assert record["wall_s"] > 0.25 and (tmp_path / "logs" / f"{name}.log").exists()


def test_a_job_record_holds_its_own_cpu_seconds_not_its_wall_time(tmp_path):
    # A job that burns ~0.6 s of CPU in a grandchild it waits for, and one that sleeps
    # 0.6 s: the records tell them apart (wall time cannot), and the busy one counts
    # the process it waited for.
    burn = ("import subprocess, sys; subprocess.run([sys.executable, '-c', "
            "'import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.6: pass'])")
    jobs = [rp.Job("burn", (sys.executable, "-c", burn)),
            rp.Job("sleep", (sys.executable, "-c", "import time; time.sleep(0.6)"))]
    rp.run(jobs, tmp_path, workers=2, log=lambda m: None)
    burn_r, sleep_r = (json.loads((tmp_path / "jobs" / f"{n}.json").read_text())
                       for n in ("burn", "sleep"))
    assert burn_r["cpu_s"] >= 0.6, burn_r
    assert sleep_r["wall_s"] >= 0.6 and sleep_r["cpu_s"] < 0.4, sleep_r


@pytest.mark.parametrize("user, expected", [(None, "1"), ("0", "0")])
def test_jobs_get_one_cpu_device_unless_the_user_says(tmp_path, monkeypatch, user, expected):
    # One single-device job per core: the report's numbers do not depend on --jobs.
    if user is None:
        monkeypatch.delenv("TGD_CPU_DEVICES", raising=False)
    else:
        monkeypatch.setenv("TGD_CPU_DEVICES", user)
    code = ("import os; open(os.path.join(os.environ['OUT'], 'env.txt'), 'w')"
            ".write(os.environ.get('TGD_CPU_DEVICES', 'unset'))")
    rp.run([rp.Job("e", (sys.executable, "-c", code))], tmp_path, workers=1,
           log=lambda m: None, env={"OUT": str(tmp_path)})
    assert (tmp_path / "env.txt").read_text() == expected


def test_failure_stops_dependents_names_the_job_and_a_rerun_resumes(tmp_path):
    flag = tmp_path / "fail"
    flag.write_text("1")
    fail = f"import os\nif os.path.exists({str(flag)!r}): raise SystemExit('boom in b')"
    jobs = [_job("a", tmp_path), _job("b", tmp_path, deps=("a",), code=fail),
            _job("c", tmp_path, deps=("b",))]
    with pytest.raises(RunError, match="'b' failed.*boom in b"):
        rp.run(jobs, tmp_path, workers=1, log=lambda m: None)
    assert not (tmp_path / "jobs" / "c.json").exists()
    assert "start c" not in (tmp_path / "trace.txt").read_text()
    flag.unlink()
    (tmp_path / "trace.txt").write_text("")
    lines = []
    rp.run(jobs, tmp_path, workers=1, log=lines.append)
    assert "1 already done, 2 to run" in lines[0]
    assert (tmp_path / "trace.txt").read_text().split() == ["start", "b", "end", "b", "start",
                                                            "c", "end", "c"]


def test_a_job_made_by_another_command_is_not_reused(tmp_path):
    rp.run([_job("a", tmp_path)], tmp_path, workers=1, log=lambda m: None)
    changed = _job("a", tmp_path, code="x = 1")
    with pytest.raises(UsageError, match="job 'a' .* another command"):
        rp.run([changed], tmp_path, workers=1, log=lambda m: None)


def test_a_finished_job_whose_input_is_gone_or_newer_is_refused(tmp_path):
    jobs = [_job("a", tmp_path), _job("b", tmp_path, deps=("a",))]
    rp.run(jobs, tmp_path, workers=1, log=lambda m: None)
    (tmp_path / "jobs" / "a.json").unlink()  # a's output is to be made again
    with pytest.raises(UsageError, match="out of date: b"):
        rp.run(jobs, tmp_path, workers=1, log=lambda m: None)
    assert not (tmp_path / "jobs" / "a.json").exists()  # nothing ran


# --- the report's rules ---------------------------------------------------------------------


def test_compare_counts_only_differences_beyond_twice_the_spread():
    a = report.stat([1.0, 1.2, 0.8])  # sd 0.2
    assert report.compare(a, report.stat([1.3, 1.5, 1.1])) == 0  # 0.3 apart <= 0.4
    assert report.compare(a, report.stat([1.5, 1.7, 1.3])) == -1  # 0.5 apart > 0.4
    assert report.compare(report.stat([2.0]), a) is None  # one seed: no finding
    assert str(report.stat([1.0, 3.0])) == "2.00 ± 1.41"


def _collection(tgd_bias, v2_bias, tgd_cov=7.0, v2_cov=7.0):
    systems = {f"{p}-s{s}": rp.System(label, s, kind="train" if p.endswith("net") and p[0] == "v"
                                      else "finetune")
               for s in range(3) for p, label in (("v1net", "v1-net"), ("v2net", "v2-net"),
                                                  ("ftnet", "FT-net"), ("tgdnet", "TGD-net"))}
    values = {"v1-net": (-10.0, 7.0), "v2-net": (v2_bias, v2_cov), "FT-net": (-9.0, 8.0),
              "TGD-net": (tgd_bias, tgd_cov)}
    evals = []
    for name, s in systems.items():
        bias, cov = values[s.label]
        for bmi in ("low", "high"):
            evals.append({"network": name, "study": bmi, "bmi_class": bmi, "version": "v2",
                          "lesion_bias_pct": bias + 0.1 * s.seed, "liver_cov_pct": cov,
                          "psnr_db": 30.0})
    return {"preset": "study", "systems": systems, "evals": evals, "summaries": {},
            "records": {}, "datasets": {}, "threshold": None}


def test_claim_on_par_follows_the_rule_both_ways():
    on_par = report.claims(_collection(tgd_bias=-4.0, v2_bias=-4.1))[0]
    assert on_par[1] == "supported"
    worse = report.claims(_collection(tgd_bias=-8.0, v2_bias=-4.0))[0]
    assert worse[1] == "not supported" and "7.90 ± 0.10 vs 3.90 ± 0.10" in worse[2]
    noisier = report.claims(_collection(tgd_bias=-4.0, v2_bias=-4.0, tgd_cov=9.0))[0]
    assert noisier[1] == "not supported"


def test_a_gain_off_the_gaussian_curve_is_counted_not_averaged_away():
    c = _collection(tgd_bias=-4.0, v2_bias=-4.1)
    for r in c["evals"]:  # TGD-net seed 2 off the curve (no gain), the others on it
        r["gain_pct"] = None if r["network"] == "tgdnet-s2" else 1.0 + r["lesion_bias_pct"]
    assert report.gain_cell(c, "TGD-net", "gain_pct") == "-2.95 ± 0.07 (2 of 3 on the curve)"
    assert report.gain_cell(c, "v2-net", "gain_pct") == "-3.00 ± 0.10"  # every seed: as before
    assert "(2 of 3 on the curve)" in "\n".join(report._table1(c, {}))
    for r in c["evals"]:  # none on the curve: "-", as for one seed off it
        r["gain_pct"] = None
    assert report.gain_cell(c, "TGD-net", "gain_pct") == "-"


# --- the tiny preset end to end ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, optimized_xla):
    """The tiny preset end to end; fully optimised, since its simulator jobs run for seconds
    (unoptimised, the whole run took 15 % more CPU)."""
    del optimized_xla
    out = tmp_path_factory.mktemp("reproduce") / "tiny"
    proc = subprocess.run([sys.executable, str(ROOT / "reproduce.py"), "--preset=tiny",
                           f"--out={out}", "--jobs=2"], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.slow
def test_tiny_reproduction_writes_the_report_and_its_figures(tiny_run):
    out, stdout = tiny_run
    text = (out / "report.md").read_text()
    for section in ("## Table 1", "## Forgetting", "## High-BMI retention",
                    "## Threshold study", "## Online learning", "## Cost",
                    "## The paper's claims"):
        assert section in text
    for figure in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (out / figure).stat().st_size > 0, figure
    assert {"panel.png", "bias_vs_cov.png", "curves.png", "threshold.png", "kse_hist.png",
            "online_tgdn2n.png", "pretraining.png"} <= {p.name for p in (out / "figures").iterdir()}
    claims = json.loads((out / "report.json").read_text())["claims"]
    assert len(claims) == 9 and all(c["verdict"] for c in claims)
    assert "19 jobs, 0 already done" in stdout


@pytest.mark.slow
def test_tiny_report_numbers_are_the_evaluation_files(tiny_run):
    out, _ = tiny_run
    rows = json.loads((out / "eval" / "s0-v2" / "evaluation.json").read_text())["rows"]
    low = next(r for r in rows if r["network"] == "tgdnet-s0" and r["bmi_class"] == "low")
    high = next(r for r in rows if r["network"] == "tgdnet-s0" and r["bmi_class"] == "high")
    line = next(ln for ln in (out / "report.md").read_text().splitlines()
                if ln.startswith("| TGD-net | 1 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]

    def gain(row, key="gain_pct"):
        return "-" if row[key] is None else f"{row[key]:.2f}"

    assert cells[2:8] == [f"{low['lesion_bias_pct']:.2f}", gain(low),
                          f"{low['liver_cov_pct']:.2f}", f"{high['lesion_bias_pct']:.2f}",
                          gain(high), f"{high['liver_cov_pct']:.2f}"]
    assert cells[8:10] == ["-3.77", "6.46"]  # the paper's, beside ours
    # the headline lesion's table and the gain per lesion size, from the same rows
    text = (out / "report.md").read_text()
    assert f"**The headline lesion, `{low['headline_lesion']}`**" in text
    assert low["headline_lesion"] == "lesion_liver_13mm"
    head = text[text.index("**The headline lesion"):]
    line = next(ln for ln in head.splitlines() if ln.startswith("| TGD-net |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2:6] == [f"{low['headline_bias_pct']:.2f}", gain(low, "headline_gain_pct"),
                          f"{high['headline_bias_pct']:.2f}",
                          gain(high, "headline_gain_pct")]
    assert "## Against the Gaussian post-filter, per lesion size" in text


@pytest.mark.slow
def test_the_simulator_command_made_the_datasets_and_keeps_or_refuses_them(tiny_run, tmp_path):
    """``python -m tgd_jax.sim`` as the reproduction ran it (its sim-* jobs): the datasets,
    the report, and the same command again, which keeps the file, or with another spec,
    which is refused before any work and leaves the file as it was."""
    out, _ = tiny_run
    data = out / "data"
    log = (out / "logs" / "sim-train.log").read_text()
    assert "[train] study 2/2" in log and "done in" in log
    # JAX's INFO line about platforms it probed and did not find is not shown (issue 9;
    # tests/test_sim_cli.py holds the control showing that this JAX prints it otherwise)
    assert "Unable to initialize backend" not in log
    train = open_dataset(data / "train.h5")
    assert train.role == "train" and train.levels_s == (30.0,) and len(train.studies) == 2
    study = load_study(train.path, "study_000")
    assert study["v1/inputs/030"].shape == (4, 128, 128)
    assert {study["attrs"]["bmi_class"], load_study(train.path, "study_001")["attrs"][
        "bmi_class"]} == {"low", "high"}
    test = load_study(data / "test.h5", "study_000")
    assert test["v2/realisations"].shape == (2, 5, 128, 128) and "rois/lesion_0" in test

    checks = json.loads((data / "report.json").read_text())["checks"]
    assert set(checks) >= {"1_noise_texture_v2_finer", "6_thinning_and_halves_exact",
                           "7_projector_adjoint_and_chords"}
    assert checks["6_thinning_and_halves_exact"] and checks["7_projector_adjoint_and_chords"]
    assert (data / "examples.png").stat().st_size > 10_000

    copy = tmp_path / "data"  # a copy: the rerun test must find the run as it was
    copy.mkdir()
    shutil.copy(data / "test.h5", copy)
    before = (copy / "test.h5").read_bytes()
    argv = [a for a in json.loads((out / "jobs" / "sim-test.json").read_text())["argv"]
            if not a.startswith("--out=")] + [f"--out={copy}"]
    again = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("it holds this very dataset") == 1 and "study 1/" not in again.stdout
    other = subprocess.run([*argv, "--slices=4"], capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "study 1/" not in other.stdout
    lines = other.stderr.strip().splitlines()
    assert len(lines) == 1 and "test.h5: exists and holds another dataset" in lines[0]
    assert "--overwrite" in lines[0]
    assert (copy / "test.h5").read_bytes() == before


@pytest.mark.slow
def test_tiny_rerun_skips_every_job(tiny_run):
    out, _ = tiny_run
    proc = subprocess.run([sys.executable, str(ROOT / "reproduce.py"), "--preset=tiny",
                           f"--out={out}"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "19 already done, 0 to run" in proc.stdout


def test_bad_output_folder_is_one_line_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = subprocess.run([sys.executable, str(ROOT / "reproduce.py"), "--preset=tiny",
                           f"--out={blocker}"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("reproduce.py: error:") and str(blocker) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert blocker.read_text() == "not a folder"


def test_a_report_compares_each_claim_with_an_earlier_one(tmp_path, monkeypatch):
    from tgd_jax.pet import report as report_lib

    now = [("Claim A.", "supported", "x 1"), ("Claim B.", "not supported", "y 2")]
    monkeypatch.setattr(report_lib, "claims", lambda c: now)
    before = tmp_path / "report.json"
    before.write_text(json.dumps({"claims": [
        {"claim": "Claim A.", "verdict": "not supported", "evidence": "x 0"}]}))
    lines = report_lib._claims(report_lib.with_before({}, before))
    table = "\n".join(lines[lines.index("## Before and after"):])
    assert "| 1. Claim A. | not supported: x 0 | supported: x 1 |" in table
    assert "| 2. Claim B. | (not in it) | not supported: y 2 |" in table
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a report.json"):
        report_lib.with_before({}, tmp_path / "bad.json")


VERSION_OF = {"v1-net": "v1", "v2-net": "v2"}  # each pretrained network on its own images


def _gains(c, headline, liver10, version_of=VERSION_OF):
    """Rows with a headline gain and a 10 mm liver lesion's gain per seed (and a 6 mm one
    and a muscle one, which the verdict must ignore)."""
    for r in c["evals"]:
        label = c["systems"][r["network"]].label
        if label in version_of:
            r["version"] = version_of[label]
        seed = c["systems"][r["network"]].seed
        r["headline_gain_pct"] = headline[seed]
        r["lesions"] = {
            "lesion_liver_10mm": {"organ": "liver", "diameter_mm": 10.0,
                                  "gain_bias_pct": liver10[seed]},
            "lesion_liver_6mm": {"organ": "liver", "diameter_mm": 6.0, "gain_bias_pct": -9.0},
            "lesion_soft_13mm": {"organ": "soft", "diameter_mm": 13.0, "gain_bias_pct": -9.0}}
    return c


def test_the_denoiser_verdict_asks_for_gains_beyond_the_seed_spread():
    c = _gains(_collection(-4.0, -4.0), headline=[30.0, 32.0, 31.0], liver10=[20.0, 21.0, 22.0])
    line = report.denoiser_verdict(c)
    assert "8 gains" in line and line.endswith("all beyond the seed spread.")
    # the 10 mm liver lesion within its spread (mean 1.0, sd 1.0): named, with its value
    c = _gains(_collection(-4.0, -4.0), headline=[30.0, 32.0, 31.0], liver10=[0.0, 1.0, 2.0])
    line = report.denoiser_verdict(c)
    assert "4 not beyond the seed spread" in line
    assert "v2-net low BMI lesion_liver_10mm 1.0 ± 1.0" in line
    assert "6mm" not in line and "soft" not in line  # small and non-liver lesions: beside it
    one = _collection(-4.0, -4.0)
    one["systems"] = {k: v for k, v in one["systems"].items() if v.seed == 0}
    one["evals"] = [r for r in one["evals"] if r["network"] in one["systems"]]
    line = report.denoiser_verdict(_gains(one, headline=[30.0], liver10=[20.0]))
    assert line.endswith("all positive, with one seed (no spread to judge them against).")
    assert report.denoiser_verdict({"evals": [], "systems": {}}) == ""
