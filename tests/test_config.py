"""Settings and the trainer overrides DRAFTLOOP_OPD_TRAIN / DRAFTLOOP_SFT_BOOTSTRAP:
the settings parse them as JSON objects; the worker checks them against its
trainer configs (at start-up, and wherever a config is built)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from service.config import Settings
from worker.app import TASK_SOFT_TIME_LIMIT_S
from worker.train.config import OPDConfig, SFTConfig, check_trainer_settings
from worker.update import BOOTSTRAP_DEFAULTS, opd_config, sft_config

from .conftest import ROOT


def test_trainer_overrides_parse_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRAFTLOOP_OPD_TRAIN", '{"epochs": 3, "batch_tokens": "512", "mode": "forward_kl_all"}')
    monkeypatch.setenv("DRAFTLOOP_SFT_BOOTSTRAP", '{"num_prompts": 4, "hidden_layers": [1, 5, 9]}')
    s = Settings(_env_file=None)
    assert s.opd_train == {"epochs": 3, "batch_tokens": "512", "mode": "forward_kl_all"}  # parsed, not coerced
    check_trainer_settings(s)
    opd = opd_config(s)
    assert (opd.epochs, opd.batch_tokens, opd.mode, opd.lr) == (3, 512, "forward_kl_all", OPDConfig().lr)  # coerced
    assert opd.max_seconds is not None  # the task's own training budget stays unless overridden
    sft = sft_config(s)
    assert (sft.num_prompts, sft.hidden_layers, sft.train_steps) == (4, (1, 5, 9), SFTConfig().train_steps)


@pytest.mark.parametrize("raw", ["", "  ", "{}"])
def test_empty_overrides_are_the_defaults(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("DRAFTLOOP_OPD_TRAIN", raw)
    assert Settings(_env_file=None).opd_train == {}
    sft = sft_config(Settings(_env_file=None))
    assert sft == SFTConfig(**BOOTSTRAP_DEFAULTS)
    # each bootstrap tick fits one task: generation + a training slice leave time to gate;
    # the whole budget takes several ticks (worker.bootstrap)
    assert (sft.gen_minutes + sft.tick_minutes) * 60 < TASK_SOFT_TIME_LIMIT_S * 0.7
    assert sft.train_minutes > sft.tick_minutes


@pytest.mark.parametrize(
    ("var", "raw", "message"),
    [
        ("DRAFTLOOP_SFT_BOOTSTRAP", "[1, 2]", "DRAFTLOOP_SFT_BOOTSTRAP must be a JSON object of SFTConfig fields"),
        ("DRAFTLOOP_OPD_TRAIN", "{epochs: 3}", "DRAFTLOOP_OPD_TRAIN is not valid JSON"),
    ],
)
def test_malformed_overrides_fail_in_the_settings(monkeypatch: pytest.MonkeyPatch, var: str, raw: str, message: str) -> None:
    monkeypatch.setenv(var, raw)
    with pytest.raises(ValidationError, match=message.replace("[", r"\[")):
        Settings(_env_file=None)


BAD_KEYS = [
    ("DRAFTLOOP_OPD_TRAIN", '{"epoch": 3}', "DRAFTLOOP_OPD_TRAIN: unknown key 'epoch'"),
    ("DRAFTLOOP_OPD_TRAIN", '{"mode": "kl"}', "DRAFTLOOP_OPD_TRAIN: bad value for key 'mode'"),
    ("DRAFTLOOP_SFT_BOOTSTRAP", '{"train_steps": "many"}', "DRAFTLOOP_SFT_BOOTSTRAP: bad value for key 'train_steps'"),
]


@pytest.mark.parametrize(("var", "raw", "message"), BAD_KEYS)
def test_bad_overrides_name_the_variable_and_key(monkeypatch: pytest.MonkeyPatch, var: str, raw: str, message: str) -> None:
    monkeypatch.setenv(var, raw)
    settings = Settings(_env_file=None)  # the server does not know the trainers' fields
    with pytest.raises(ValueError, match=message):
        check_trainer_settings(settings)


def test_a_bad_key_stops_the_worker_at_start_up() -> None:
    var, raw, message = BAD_KEYS[0]
    env = {**os.environ, var: raw}
    out = subprocess.run([sys.executable, "-c", "import worker.app"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode != 0 and message in out.stderr


def test_configs_coerce_and_check_their_fields() -> None:
    assert SFTConfig(hidden_layers=[1, 5, 9]).hidden_layers == (1, 5, 9)
    with pytest.raises(ValueError, match="OPDConfig: bad value for key 'mode'"):
        OPDConfig(mode="kl")  # type: ignore[arg-type]
