"""The learning-rate finder: the range test's curve and suggestion, on made-up losses and a tiny real set."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
from conftest import SHARED_DATASETS

from tlcore.data.importer import import_dataset
from tlcore.errors import InvalidInput
from tlcore.records.config import TrainConfig
from tlcore.train.lr_finder import find_lr, learning_rates, range_test, suggest


def test_range_test_stops_at_divergence_and_suggests_a_tenth_of_the_minimum():
    rates = learning_rates(1e-6, 1.0, 100)
    assert rates[0] == pytest.approx(1e-6) and rates[-1] == pytest.approx(1.0)
    assert np.allclose(np.diff(np.log(rates)), np.log(1e6) / 99)  # evenly spaced on a log scale

    def loss(lr):  # falls until 1e-2, then climbs steeply: the shape a range test looks for
        return 2.0 - 0.3 * math.log10(lr) if lr <= 1e-2 else 2.6 + 20 * (math.log10(lr) + 2) ** 2

    curve = range_test(loss, rates)
    assert len(curve) < len(rates)  # stopped once the loss blew up
    suggested, at_min = suggest(curve)
    assert 5e-3 <= at_min <= 5e-2  # the smoothed minimum lags the true one a little
    assert suggested == pytest.approx(at_min / 10)

    nan_after_ten = range_test(lambda lr: 1.0 if lr < 1e-4 else float("nan"), rates)
    assert all(math.isfinite(loss) for _, loss in nan_after_ten) and len(nan_after_ten) == 34
    with pytest.raises(InvalidInput, match="`min_lr` must be positive and below `max_lr`"):
        learning_rates(1.0, 1e-3, 100)


@pytest.fixture
def ants_bees(tmp_path, store):
    root = tmp_path / "ants_bees"
    for label in ("ants", "bees"):
        dest = root / label
        dest.mkdir(parents=True)
        for photo in sorted((SHARED_DATASETS / "hymenoptera" / "train" / label).iterdir())[:8]:
            shutil.copy(photo, dest / photo.name)
    return import_dataset(root, name="ants-bees", store=store).dataset


def _check(curve, suggested_lr, min_loss_lr):
    lrs = [lr for lr, _ in curve]
    assert len(curve) >= 10 and all(math.isfinite(loss) for _, loss in curve)
    assert lrs == sorted(lrs) and lrs[0] <= suggested_lr <= lrs[-1]
    assert suggested_lr == pytest.approx(max(min_loss_lr / 10, lrs[0]))


def test_lr_find_cli_on_a_tiny_set_prints_a_finite_curve_and_a_suggestion_inside_it(store, ants_bees, capsys):
    from tests.test_cli import last_json, run_cli

    code, out, err = run_cli(capsys, "lr-find", "--data", "ants-bees", "--image-size", "64", "--batch-size", "4",
                             "--json")
    assert code == 0, err
    finding = last_json(out)
    assert finding["phase"] == "head" and finding["recipe_lr"] == 1e-3
    _check(finding["curve"], finding["suggested_lr"], finding["min_loss_lr"])
    print(f"head: {len(finding['curve'])} steps in {finding['seconds']:.1f} s, suggested {finding['suggested_lr']:.2g}")


def test_find_lr_through_the_top_layers(store, ants_bees):
    config = TrainConfig(dataset=ants_bees.id, image_size=64, batch_size=4, finetune_layers=6, head_epochs=2)
    finding = find_lr(config, store, phase="finetune", steps=12)
    assert finding.phase == "finetune"
    _check(finding.curve, finding.suggested_lr, finding.min_loss_lr)
    print(f"finetune: {len(finding.curve)} steps in {finding.seconds:.1f} s, suggested {finding.suggested_lr:.2g}")
