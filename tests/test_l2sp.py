"""The L2-SP baseline's strength: chosen from the candidates' held-out losses on the
fine-tuning studies, handed to finetune.py as an absl flag file, and planned by the
reproduction with nothing of the old task."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tgd_jax.pet import l2sp
from tgd_jax.pet import reproduce as rp

ROOT = Path(__file__).resolve().parent.parent


def _candidates(folder: Path, losses: dict[str, float]) -> Path:
    for name, loss in losses.items():
        (folder / name).mkdir(parents=True)
        (folder / name / "summary.json").write_text(json.dumps({"best_val_loss": loss}))
    (folder / "notes").mkdir()  # not a strength: ignored
    return folder


def test_the_lowest_held_out_loss_wins_and_reaches_finetune_as_a_flag(tmp_path):
    folder = _candidates(tmp_path / "select", {"0.001": 0.0052, "0.1": 0.0049, "10": 0.0061})
    record = l2sp.write_choice(folder)
    assert record["strength"] == 0.1
    assert json.loads((folder / "strength.json").read_text()) == record
    # finetune.py reads the flag file: with re-initialisation the chosen (non-zero) strength
    # is refused by name, before anything is loaded or written
    proc = subprocess.run(
        [sys.executable, str(ROOT / "finetune.py"), f"--workdir={tmp_path / 'run'}",
         "--config=configs/finetune.py:tiny", f"--checkpoint={tmp_path}",
         "--config.tgd.reinit_scale=1", f"--flagfile={folder / 'strength.flags'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "optimizer.l2_sp pulls toward the starting weights" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_tie_goes_to_the_stronger_penalty():
    assert l2sp.choose_strength({0.01: 0.5, 1.0: 0.5, 0.1: 0.6}) == 1.0


@pytest.mark.parametrize("summary", ["{}", "not json", '{"best_val_loss": NaN}'],
                         ids=["no-key", "damaged", "nan"])
def test_a_bad_candidate_is_named(tmp_path, summary):
    folder = _candidates(tmp_path / "select", {"0.1": 0.5})
    (folder / "1").mkdir()
    (folder / "1" / "summary.json").write_text(summary)
    with pytest.raises(ValueError, match=r"select/1/summary\.json"):
        l2sp.write_choice(folder)
    assert not (folder / "strength.flags").exists()


def test_no_candidate_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no candidate workdirs"):
        l2sp.candidate_losses(tmp_path)


def test_the_plan_chooses_on_the_fine_tuning_studies_then_runs_every_seed(tmp_path):
    jobs = {j.name: j for j in rp.plan("study", tmp_path)}
    strengths = rp.PRESETS["study"].l2sp_strengths
    select = [jobs[f"l2sp-select-{s:g}"] for s in strengths]
    for job in select:
        argv = " ".join(job.argv)
        assert "--config.data.val_studies=1" in argv and "--method=full" in argv
        assert "validation.path" not in argv and "old_task" not in argv  # no old data
        assert job.system is None  # a candidate, not a network of the comparison
    assert set(jobs["l2sp-strength"].deps) == {j.name for j in select}
    for seed in rp.PRESETS["study"].seeds:
        job = jobs[f"l2sp-s{seed}"]
        assert "l2sp-strength" in job.deps
        assert job.argv[-1] == f"--flagfile={tmp_path}/l2sp-select/strength.flags"
        assert job.system.label == rp.L2SP_LABEL
    assert not any("l2sp" in j.name for j in rp.plan("demo", tmp_path))


def test_the_report_says_how_the_strength_was_chosen(tmp_path):
    from tgd_jax.pet import report

    assert report._l2sp_choice({"out": str(tmp_path)}) == ""  # no L2-SP in this run
    _candidates(tmp_path / "l2sp-select", {"0.01": 0.0052, "1": 0.0049})
    l2sp.write_choice(tmp_path / "l2sp-select")
    line = report._l2sp_choice({"out": str(tmp_path)})
    assert "**1**" in line and "0.01: 0.00520, 1: 0.00490" in line
