"""Every shipped run config in configs/ is one that its command accepts.

The configs are the documented commands behind the shipped models (README, models/README.md, the Makefile);
a field renamed in the code, or a value the validation refuses (e.g. ``stop_at`` past ``steps``), would only
show when someone reruns a multi-hour recipe. Each file must parse into exactly the config class its name
says, and into no other."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sana_sprint.training.config import ConfigError, TeacherConfig
from sana_sprint.training.controlnet import ControlNetConfig
from sana_sprint.training.distill import DistillConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.json"))
CLASSES = (TeacherConfig, DistillConfig, ControlNetConfig)


def expected_class(name: str) -> type:
    if name.startswith("shapes-controlnet"):
        return ControlNetConfig  # a ControlNet teacher (train-controlnet)
    if name.startswith(("shapes-distill", "shapes-sprint-controlnet")):
        return DistillConfig
    if name.startswith("shapes-teacher"):
        return TeacherConfig
    raise AssertionError(f"configs/{name}: no rule says which command reads it")


def accepting(d: dict) -> list[type]:
    ok = []
    for cls in CLASSES:
        try:
            cls.from_dict(d)
        except ConfigError:
            continue
        ok.append(cls)
    return ok


def test_there_are_configs():
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_into_its_class_only(path):
    d = json.loads(path.read_text())
    assert accepting(d) == [expected_class(path.name)]


def test_a_bad_field_is_refused():
    # the check above can fail: a misspelt field, or a stop step past the schedule, is refused by every class
    d = json.loads((CONFIGS[0].parent / "shapes-teacher-v6.json").read_text())
    assert accepting(d) == [TeacherConfig]
    assert accepting({**d, "stop_att": 5}) == []
    assert accepting({**d, "stop_at": d["steps"] + 1}) == []
