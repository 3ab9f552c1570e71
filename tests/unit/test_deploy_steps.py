"""prefect.yaml's build step: deployment runs start ``prefect.engine`` with this interpreter, no supervisor between."""

from __future__ import annotations

import shlex
import sys

import yaml
from conftest import ROOT

from flows.deploy_steps import engine_command


def test_the_engine_command_is_this_interpreter_running_prefect_engine() -> None:
    assert shlex.split(engine_command()["command"]) == [sys.executable, "-m", "prefect.engine"]


def test_every_deployment_of_prefect_yaml_starts_its_runs_with_the_engine_command() -> None:
    project = yaml.safe_load((ROOT / "prefect.yaml").read_text(encoding="utf-8"))
    steps = [step for step in project["build"] if "flows.deploy_steps.engine_command" in step]
    assert [step["flows.deploy_steps.engine_command"]["id"] for step in steps] == ["engine"]
    for deployment in project["deployments"]:
        assert deployment["work_pool"]["job_variables"]["command"] == "{{ engine.command }}", deployment["name"]
