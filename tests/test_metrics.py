"""The metrics logger on its own: records, rates and ETA from an injected clock, and the
non-finite check that stops a run before anything is written for the bad step."""

from __future__ import annotations

import json
import math

import pytest

from tgd_jax.train.metrics import (
    MetricsLogger,
    NonFiniteLossError,
    hms,
    initial_losses,
    truncate_metrics,
)


class Clock:
    def __init__(self, t=100.0):
        self.t = t

    def __call__(self):
        return self.t


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_records_mean_loss_rate_and_eta(tmp_path):
    clock, lines = Clock(), []
    logger = MetricsLogger(tmp_path / "m.jsonl", num_steps=100, start=10, log=lines.append,
                           clock=clock)
    clock.t = 104.0  # 10 steps (11..20) in 4 s: 2.5 steps/s, 80 steps left: 32 s
    values = [{"loss": 1.0 + i, "grad_norm": 0.5 * i} for i in range(10)]
    record = logger.train(20, values, first_step=10)
    assert record["loss"] == pytest.approx(5.5) and record["loss_last"] == 10.0
    assert record["grad_norm"] == 4.5
    assert record["steps_per_s"] == pytest.approx(2.5)
    assert record["eta_s"] == pytest.approx(32.0) and record["elapsed_s"] == pytest.approx(4)
    assert _records(tmp_path / "m.jsonl") == [record]
    assert lines == ["step 20/100  loss 5.5  2.50 steps/s  ETA 0:00:32"]
    clock.t = 108.0  # the next rate counts from the last record, not from the start
    assert logger.train(30, values, first_step=20)["steps_per_s"] == pytest.approx(2.5)


def test_gate_cosine_is_averaged_over_the_steps_of_a_record(tmp_path):
    logger = MetricsLogger(tmp_path / "m.jsonl", 4, log=lambda m: None, clock=Clock())
    values = [{"loss": 1.0, "grad_norm": 1.0, "gate_cosine": c} for c in (0.2, 0.4)]
    assert logger.train(2, values, first_step=0)["gate_cosine"] == pytest.approx(0.3)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_training_loss_names_its_step_and_writes_nothing(tmp_path, bad):
    path = tmp_path / "m.jsonl"
    logger = MetricsLogger(path, 100, log=lambda m: None, clock=Clock())
    values = [{"loss": 1.0, "grad_norm": 1.0}, {"loss": bad, "grad_norm": 1.0}]
    with pytest.raises(NonFiniteLossError, match=f"training loss is {bad} at step 12; "
                                                 "stopped. see here"):
        logger.train(12, values, first_step=10, where=" see here")
    assert not path.exists()


def test_validation_records_and_refuses_non_finite(tmp_path):
    path, lines = tmp_path / "m.jsonl", []
    logger = MetricsLogger(path, 50, log=lines.append, clock=Clock())
    logger.validation(0, 0.5, {"val_loss_old": 0.25})
    logger.validation(10, 0.4, {}, best=True)
    with pytest.raises(NonFiniteLossError, match="validation loss is nan at step 20"):
        logger.validation(20, math.nan, {}, best=False)
    assert _records(path) == [{"step": 0, "val_loss": 0.5, "val_loss_old": 0.25},
                              {"step": 10, "val_loss": 0.4, "best": True}]
    assert lines == ["step 0/50  validation loss 0.5 (before training)  val_loss_old 0.25",
                     "step 10/50  validation loss 0.4  (best)"]


def test_no_file_is_written_without_a_path(tmp_path):
    logger = MetricsLogger(None, 10, log=lambda m: None, clock=Clock())  # non-main host
    logger.train(2, [{"loss": 1.0, "grad_norm": 1.0}], first_step=1)
    logger.validation(2, 1.0, {}, best=True)
    assert list(tmp_path.iterdir()) == []


def test_truncate_and_initial_losses(tmp_path):
    path = tmp_path / "m.jsonl"
    assert initial_losses(path) == (None, {})
    lines = [{"step": 0, "val_loss": 0.9, "val_loss_old": 0.3}, {"step": 4, "loss": 1.0},
             {"step": 8, "loss": 0.5}, {"step": 8, "val_loss": 0.7}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    truncate_metrics(path, 4)
    assert _records(path) == lines[:2]
    assert initial_losses(path) == (0.9, {"val_loss_old": 0.3})
    truncate_metrics(path, -1)
    assert path.read_text() == ""


def test_hms():
    assert [hms(s) for s in (0, 59.6, 3725)] == ["0:00:00", "0:01:00", "1:02:05"]


def test_plateau_is_the_fall_over_the_last_quarter():
    from tgd_jax.train.metrics import plateau

    records = [{"step": s, "val_loss": v} for s, v in
               ((0, 1.0), (500, 0.5), (1000, 0.30), (1500, 0.21), (2000, 0.20))]
    records.insert(2, {"step": 600, "loss": 9.0})  # training records are ignored
    p = plateau(records, 2000)
    assert (p["from_step"], p["to_step"]) == (1500, 2000)
    assert p["fall"] == pytest.approx(0.01 / 0.21) and p["plateau"]
    p = plateau(records, 2000, fraction=0.5)  # from step 1000: 0.30 -> 0.20
    assert p["from_step"] == 1000 and p["fall"] == pytest.approx(1 / 3) and not p["plateau"]
    # between validations: the last one at or before 3/4 of the run
    p = plateau(records[:-1] + [{"step": 1800, "val_loss": 0.25},
                                {"step": 2000, "val_loss": 0.2}], 2000)
    assert p["from_step"] == 1500
    with pytest.raises(ValueError, match="last step 4000"):
        plateau(records, 4000)
    with pytest.raises(ValueError, match="every quarter"):
        plateau([{"step": 1900, "val_loss": 1.0}, {"step": 2000, "val_loss": 0.9}], 2000)
