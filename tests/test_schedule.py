"""Learning-rate schedules: warmup-stable-decay and its decay shapes, a re-warmup, the dry run's key
points, and a stable phase resumed into a decay exactly as a run planned with that decay."""

from __future__ import annotations

import math

import pytest

from megatron_apex.config import ConfigError, load_config
from megatron_apex.training.schedule import describe, lr_at, wsd_decay_steps

BASE = ["data.mock=true", "model.vocab_size=256", "data.tokenizer_type=none", "optimizer.lr=1.0",
        "optimizer.min_lr=0.1", "optimizer.lr_warmup_steps=10", "train.train_steps=110"]


def _cfg(*overrides):
    return load_config(None, [*BASE, *overrides])


@pytest.mark.parametrize("shape,at_95,at_100", [
    ("1-sqrt", 0.1 + 0.9 * (1 - math.sqrt(0.25)), 0.1 + 0.9 * (1 - math.sqrt(0.5))),
    ("linear", 0.1 + 0.9 * 0.75, 0.1 + 0.9 * 0.5),
    ("cosine", 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)), 0.55),
])
def test_wsd_warms_up_holds_then_decays_over_its_last_steps(shape, at_95, at_100):
    cfg = _cfg("optimizer.lr_decay_style=wsd", "optimizer.lr_wsd_decay_steps=20",
               f"optimizer.lr_wsd_decay_shape={shape}")
    assert [lr_at(cfg, s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])   # warmup
    assert all(lr_at(cfg, s) == 1.0 for s in range(10, 91))                       # stable, decay starts at 90
    assert lr_at(cfg, 95) == pytest.approx(at_95) and lr_at(cfg, 100) == pytest.approx(at_100)
    assert lr_at(cfg, 110) == pytest.approx(0.1) and lr_at(cfg, 200) == pytest.approx(0.1)
    assert all(lr_at(cfg, s) > lr_at(cfg, s + 1) for s in range(90, 110))        # strictly decreasing


def test_wsd_decay_length_defaults_to_a_fraction_and_zero_never_decays():
    cfg = _cfg("optimizer.lr_decay_style=wsd")  # 10 % of the 100 steps after warmup
    assert wsd_decay_steps(cfg) == 10 and lr_at(cfg, 99) == 1.0 and lr_at(cfg, 100) == 1.0 and lr_at(cfg, 105) < 1
    cfg = _cfg("optimizer.lr_decay_style=wsd", "optimizer.lr_wsd_decay_fraction=0.25", "optimizer.lr_decay_steps=90")
    assert wsd_decay_steps(cfg) == 20 and lr_at(cfg, 70) == 1.0 and lr_at(cfg, 90) == pytest.approx(0.1)
    stable = _cfg("optimizer.lr_decay_style=wsd", "optimizer.lr_wsd_decay_steps=0")
    assert all(lr_at(stable, s) == 1.0 for s in range(10, 200))


def test_rewarmup_scales_the_schedule_from_zero_back_to_itself():
    cfg = _cfg("optimizer.lr_decay_style=wsd", "optimizer.lr_wsd_decay_steps=20", "optimizer.lr_rewarmup_start=50",
               "optimizer.lr_rewarmup_steps=4")
    assert [lr_at(cfg, s) for s in range(49, 55)] == pytest.approx([1.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    plain = _cfg("optimizer.lr_decay_style=wsd", "optimizer.lr_wsd_decay_steps=20")
    cosine = _cfg("optimizer.lr_rewarmup_start=92", "optimizer.lr_rewarmup_steps=2")  # on a decaying schedule too
    assert lr_at(cosine, 92) == pytest.approx(0.5 * lr_at(_cfg(), 92)) and lr_at(cosine, 94) == lr_at(_cfg(), 94)
    assert lr_at(plain, 50) == 1.0


@pytest.mark.parametrize("overrides,field", [
    (["optimizer.lr_decay_style=wsd", "optimizer.lr_wsd_decay_steps=101"], "optimizer.lr_wsd_decay_steps=101"),
    (["optimizer.lr_wsd_decay_steps=-1"], "optimizer.lr_wsd_decay_steps=-1"),
    (["optimizer.lr_wsd_decay_fraction=1.5"], "optimizer.lr_wsd_decay_fraction"),
    (["optimizer.lr_rewarmup_start=5"], "optimizer.lr_rewarmup_steps=0"),
    (["optimizer.lr_decay_style=wsd", "optimizer.lr_wsd_decay_shape=exp"], "optimizer.lr_wsd_decay_shape"),
])
def test_schedule_settings_are_checked(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _cfg(*overrides)


def test_dry_run_prints_the_schedule_key_points(tiny_config, capsys):
    from megatron_apex.cli import main

    wsd = ["optimizer.lr_decay_style=wsd", "optimizer.lr_wsd_decay_steps=20", "optimizer.lr_rewarmup_start=50",
           "optimizer.lr_rewarmup_steps=4"]
    assert main(["train", tiny_config, *BASE, *wsd, "--dry-run", "--world-size", "1"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("schedule: "))
    assert line == ("schedule: wsd: warmup 0 -> 1 over steps [0, 10); stable at 1 until step 90, then 1-sqrt decay "
                    "to 0.1 over steps [90, 110); re-warmup x (0 -> 1) over steps [50, 54); step 109 (the last): 0.1228")
    assert line[len("schedule: "):] == describe(_cfg(*wsd))
    assert "stable at 1 to the end (no decay" in describe(_cfg("optimizer.lr_decay_style=wsd",
                                                               "optimizer.lr_wsd_decay_steps=0"))


@pytest.mark.slow
def test_a_stable_phase_resumes_into_a_decay_as_if_planned(tiny_config, tiny_data, tmp_path):
    """A wsd run without decay (lr_wsd_decay_steps=0) stops at its last stable step; resumed from its
    checkpoint with more steps and a decay it continues exactly (fp32, one thread: bit-identical losses
    and rates) as a run planned with that decay from the start; TensorBoard records the rates."""
    from helpers import tiny_overrides
    from training_workers import tensorboard_losses, trainer_in_process

    from megatron_apex.distributed import destroy_distributed

    wsd = {"optimizer.lr_decay_style": "wsd", "optimizer.lr_warmup_steps": 1, "optimizer.lr": 3e-3,
           "optimizer.min_lr": 3e-4}
    try:
        stable = str(tmp_path / "stable")
        first = trainer_in_process(tiny_config, tiny_overrides(tiny_data, **{
            **wsd, "train.train_steps": 4, "optimizer.lr_wsd_decay_steps": 0, "checkpoint.save": stable}))
        first.train()
        planned = trainer_in_process(tiny_config, tiny_overrides(tiny_data, **{
            **wsd, "train.train_steps": 7, "optimizer.lr_wsd_decay_steps": 3,
            "logging.tensorboard_dir": str(tmp_path / "tb")})).train()
        resumed = trainer_in_process(tiny_config, tiny_overrides(tiny_data, **{
            **wsd, "train.train_steps": 7, "optimizer.lr_wsd_decay_steps": 3, "checkpoint.save": stable}))
        assert resumed.step == 4
        result = resumed.train()
    finally:
        destroy_distributed()
    assert sorted(result.losses) == [4, 5, 6]
    assert all(result.losses[s] == planned.losses[s] for s in (4, 5, 6)), (result.losses, planned.losses)
    rates = tensorboard_losses(str(tmp_path / "tb"), "train/lr")
    assert rates[3] == pytest.approx(3e-3) and rates[4] == pytest.approx(3e-3) and rates[6] < rates[5] < 3e-3
