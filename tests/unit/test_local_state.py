"""A deployment's local state (Faust's data directories and the write processes'
stores, one per web port a worker of it ran on) is found by its application id and
deleted with the deployment, and nothing of another deployment goes with it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from app.faust_app import worker_datadir
from app.local.deployments import delete_local_state, local_state
from app.settings import Settings
from app.writer import state_dir


def _worker_ran(settings: Settings, port: int, processes: int) -> list[Path]:
    """The folders a worker of ``settings`` on ``port`` leaves behind."""
    on_port = dataclasses.replace(settings, web_port=port)
    made = [worker_datadir(on_port)]
    made += [state_dir(on_port, index) for index in range(processes)]
    for path in made:
        path.mkdir(parents=True)
        (path / "data").write_bytes(b"x")
    return made


def test_every_worker_of_the_deployment_and_nothing_else(tmp_path: Path) -> None:
    mine = Settings(home=tmp_path, app_id="streamfold-test-ab12cd34")
    # Ids that share the prefix, and the same id under another home.
    longer = dataclasses.replace(mine, app_id="streamfold-test-ab12cd34w")
    named = dataclasses.replace(mine, app_id="streamfold-test-ab12cd34-raw-loop")
    elsewhere = dataclasses.replace(mine, home=tmp_path / "other")
    left = _worker_ran(longer, 6066, 1) + _worker_ran(named, 6066, 1)
    left += _worker_ran(elsewhere, 6066, 1)
    made = _worker_ran(mine, 6066, 2) + _worker_ran(mine, 41001, 1)

    assert local_state(mine) == sorted(made)
    delete_local_state(mine)
    assert local_state(mine) == []
    assert not any(path.exists() for path in made)
    assert all((path / "data").exists() for path in left)


def test_a_deployment_that_never_ran_a_worker_has_none(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "empty", app_id="streamfold-test-00000000")
    assert local_state(settings) == []
    delete_local_state(settings)  # nothing to delete is not an error
    assert not (tmp_path / "empty").exists()
