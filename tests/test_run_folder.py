"""The run folder's optional files as older versions left them: no config.json or no `tta` in it,
a checkpoint whose state file is missing or damaged."""

from __future__ import annotations

import json

import pytest

from tlcore.records.run_folder import RunFolder


@pytest.mark.parametrize("config, tta", [(None, "none"), ({}, "none"), ({"tta": None}, "none"),
                                         ("{damaged", "none"), ({"tta": "flip"}, "flip")])
def test_tta_defaults_to_none_for_runs_from_before_it(config, tta):
    folder = RunFolder("run-1").created()
    if config is not None:
        folder.config_file.write_text(config if isinstance(config, str) else json.dumps(config))
    assert folder.tta() == tta
    assert folder.config() == (config if isinstance(config, dict) else {})


@pytest.mark.parametrize("state", [None, "{damaged", json.dumps({"phase": "finetune"}), json.dumps([1])])
def test_a_checkpoint_without_a_readable_state_is_no_checkpoint(state):
    folder = RunFolder("run-2").created()
    folder.checkpoint_weights.write_bytes(b"weights")
    if state is not None:
        folder.checkpoint_state.write_text(state)
    assert folder.checkpoint() is None
    folder.write_checkpoint_state("finetune", 3)
    checkpoint = folder.checkpoint()
    assert (checkpoint.phase, checkpoint.epoch, checkpoint.weights) == ("finetune", 3, folder.checkpoint_weights)
