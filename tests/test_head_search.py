"""The head chooses its own settings on cached features: class weighting auto, the head search,
and the fine-tune kept only when it beats the head."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tlcore.records.config import RunSpec
from tlcore.records.run_record import HeadTrial, RunSummary
from tlcore.train import head_search
from tlcore.train.head_search import TrialSettings


def _trial(f1: float, accuracy: float, class_weight: str) -> HeadTrial:
    return HeadTrial(lr=1e-3, dropout=0.2, label_smoothing=0.0, class_weight=class_weight, val_macro_f1=f1,
                     val_accuracy=accuracy)


def test_the_better_validation_macro_f1_wins_and_a_tie_keeps_no_class_weighting():
    assert head_search.choose([_trial(0.80, 0.9, "none"), _trial(0.85, 0.8, "balanced")]) == 1
    assert head_search.choose([_trial(0.85, 0.9, "none"), _trial(0.80, 0.95, "balanced")]) == 0
    assert head_search.choose([_trial(0.85, 0.9, "balanced"), _trial(0.85, 0.9, "none")]) == 1


def _imbalanced_features(seed: int, n_big: int, n_small: int):
    """Two overlapping Gaussian classes in 16 dimensions, the second rare: weighting it changes the head."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(0.0, 1.0, (n_big, 16)), rng.normal(0.6, 1.0, (n_small, 16))]).astype(np.float32)
    return np.maximum(x, 0), np.array([0] * n_big + [1] * n_small)


def test_auto_class_weight_fits_both_ways_and_keeps_the_better_validation_macro_f1():
    x_train, y_train = _imbalanced_features(0, 120, 12)
    x_val, y_val = _imbalanced_features(1, 40, 10)
    trials = head_search.trial_grid(1e-2, 0.2, "auto", search=False)
    assert [t.class_weight for t in trials] == ["none", "balanced"]

    fitted = head_search.fit_heads(x_train, y_train, x_val, y_val, 2, trials, lr_scale=1.0, batch_size=16,
                                   max_epochs=6, patience=3, seed=0)

    none, balanced = fitted.record.trials
    choice = fitted.record.class_weight
    assert (choice.none_val_macro_f1, choice.balanced_val_macro_f1) == (none.val_macro_f1, balanced.val_macro_f1)
    assert none.val_macro_f1 != balanced.val_macro_f1  # the rare class makes the weighting matter here
    better = "balanced" if balanced.val_macro_f1 > none.val_macro_f1 else "none"
    assert choice.chosen == fitted.chosen.class_weight == better
    # The kept weights are the chosen trial's best epoch: they score what the record says on validation.
    kernel, bias = fitted.chosen_weights()
    pred = (x_val @ kernel + bias).argmax(1)
    assert np.mean(pred == y_val) == pytest.approx(fitted.chosen.val_accuracy)


@pytest.mark.parametrize("lr_scale", [1.0, 2.0])
def test_a_heads_training_matches_keras_dense_softmax_with_adam_at_the_runs_scaled_rate(lr_scale):
    """The search trains at the trial's rate times the run's `lr_scale` (its global batch's factor),
    as the single Keras head fit does; the record keeps the recipe's unscaled rate."""
    rng = np.random.default_rng(0)
    x, y = rng.random((8, 5)).astype(np.float32), np.array([0, 1, 2, 0, 1, 2, 0, 1])
    trial = TrialSettings(lr=0.05, dropout=0.0, label_smoothing=0.0, class_weight="none")
    # One full batch for one epoch: no shuffling or dropout can differ between the two.
    fitted = head_search.fit_heads(x, y, x, y, 3, [trial], lr_scale=lr_scale, batch_size=8, max_epochs=1,
                                   patience=5, seed=3)
    assert fitted.chosen.lr == 0.05
    init_kernel = np.random.default_rng(3).uniform(-np.sqrt(6 / 8), np.sqrt(6 / 8), (1, 5, 3)).astype(np.float32)[0]
    dense = keras.layers.Dense(3, activation="softmax")
    model = keras.Sequential([keras.Input((5,)), dense])
    dense.set_weights([init_kernel, np.zeros(3, np.float32)])
    model.compile(optimizer=keras.optimizers.Adam(0.05 * lr_scale), loss=keras.losses.SparseCategoricalCrossentropy())
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    kernel, bias = fitted.chosen_weights()
    np.testing.assert_allclose(kernel, dense.get_weights()[0], atol=1e-5)
    np.testing.assert_allclose(bias, dense.get_weights()[1], atol=1e-5)


def test_a_default_run_logs_every_head_trial_and_records_the_choice(trained_run, monkeypatch, capsys):
    """The session's trained run used the defaults (head search and class weighting auto)."""
    from tlcore import cli
    from tlcore.records.store import Store

    monkeypatch.setenv("TLCORE_HOME", str(trained_run.home))
    store = Store()
    run = store.get_run(trained_run.run_id)
    search = run.summary.head_search
    assert search is not None and len(search.trials) >= 24
    assert {t.class_weight for t in search.trials} == {"none", "balanced"}
    assert {t.lr for t in search.trials} >= {3e-4, 1e-3, 3e-3}
    assert {t.label_smoothing for t in search.trials} == {0.0, 0.1}
    assert all(t.epochs >= 1 for t in search.trials)
    chosen = search.trials[search.chosen]
    assert chosen.val_macro_f1 == max(t.val_macro_f1 for t in search.trials)
    assert run.summary.class_weight == chosen.class_weight == search.class_weight.chosen
    log = "\n".join(line.message for line in store.logs(run.id))
    for k in range(1, len(search.trials) + 1):
        assert f"Head trial {k}/{len(search.trials)}" in log
    assert f"Class weighting auto: {chosen.class_weight} kept" in log
    # The chosen trial's curve is the run's head phase.
    assert [e.phase for e in store.epochs(run.id)] == ["head"] * chosen.epochs
    # Older summaries (no search recorded) still read.
    assert RunSummary.from_dict({k: v for k, v in run.summary.to_dict().items()
                                 if k not in ("head_search", "class_weight", "finetune")}).head_search is None

    assert cli.main(["runs", "show", run.id]) == 0
    shown = capsys.readouterr().out
    assert f"head search: {len(search.trials)} trials" in shown
    assert search.class_weight.describe() in shown


def test_the_saved_model_holds_the_mean_of_the_heads_and_the_fine_tuned_weights(store, monkeypatch, tmp_path):
    """The default `finetune_result` "average", through a real run: the layers the fine-tune trained end
    halfway between their weights after the head phase and after the fine-tune, and that is what is saved."""
    from tests.test_jobs import make_image_folder
    from tlcore.data.importer import import_dataset
    from tlcore.deploy.inference import load_run_model
    from tlcore.records.run_folder import RunFolder
    from tlcore.records.store import RunStatus
    from tlcore.train.training import _Training, execute_run

    folder = make_image_folder(tmp_path / "colours", per_class=8, size=32)
    dataset = import_dataset(folder, name="colours", store=store).dataset
    ends = {}
    real_choice = _Training.choose_finetune_result

    def choose(self):
        ends.update(head={v.path: value for v, value in self.head_weights},
                    tuned={v.path: np.array(v.numpy()) for v, _ in self.head_weights})
        real_choice(self)

    monkeypatch.setattr(_Training, "choose_finetune_result", choose)
    config = dict(dataset=dataset.id, weights="imagenet", image_size=32, batch_size=4, head_epochs=2,
                  finetune_epochs=1, finetune_layers=4, lr=0.01, finetune_lr_scale=10.0)
    run = store.create_run("ft", RunSpec.from_dict(config), status=RunStatus.RUNNING)
    summary = execute_run(run.id, store)

    decision = summary.finetune
    assert decision.kept == "average" and 0.0 <= decision.averaged_val_accuracy <= 1.0
    log = "\n".join(line.message for line in store.logs(run.id))
    assert "The fine-tuned weights were averaged with the head's" in log
    saved = {v.path: v.numpy() for v in load_run_model(run.id).model.weights}
    moved = [path for path in ends["head"] if not np.allclose(ends["head"][path], ends["tuned"][path])]
    assert moved, "the fine-tune should have changed the layers it trains"
    for path in ends["head"]:
        np.testing.assert_allclose(saved[path], (ends["head"][path] + ends["tuned"][path]) / 2, atol=1e-6)
    assert RunFolder(run.id).checkpoint_head.is_file()  # for a run that resumes this one in the fine-tune


def _decide(mode: str, head_correct: list[bool], after: list[list[bool]]):
    """`_Training.choose_finetune_result` alone, on one variable: the head phase left zeros, the fine-tune
    ones; `after` is what the validation images say after the fine-tune (then of the average)."""
    from types import SimpleNamespace

    from tlcore.train.training import _Training

    weight = keras.Variable(np.ones(3, "float32"))
    answers = iter(np.array(a) for a in after)
    lines = []
    training = SimpleNamespace(head_weights=[(weight, np.zeros(3, "float32"))], head_val_correct=np.array(head_correct),
                               val_correct=lambda: next(answers), config=SimpleNamespace(finetune_result=mode),
                               log=lines.append)
    _Training.choose_finetune_result(training)
    return training.finetune_decision, weight.numpy(), lines[0]


@pytest.mark.parametrize("tuned, kept, said", [([True] * 9 + [False], "head", "The fine-tune did not beat the head"),
                                               ([True] * 10, "finetune", "Fine-tuned weights kept")],
                         ids=["tie", "above"])
def test_best_keeps_the_fine_tune_only_when_it_ends_above_the_head(tuned, kept, said):
    """`finetune_result` "best": a tie shows no help, so the head stays."""
    decision, weight, line = _decide("best", [False] + [True] * 9, [tuned])
    assert decision.kept == kept and line.startswith(said)
    np.testing.assert_array_equal(weight, np.zeros(3) if kept == "head" else np.ones(3))


def test_average_stays_unless_validation_shows_it_clearly_worse_than_the_head():
    """`finetune_result` "average": a few images either way is chance and the average stays; the head comes
    back only when many more images are lost than won (McNemar's test)."""
    head = [True] * 40
    level = [True] * 37 + [False] * 3  # 3 images lost, none won: p = 0.25
    decision, weight, line = _decide("average", head, [level, level])
    assert decision.kept == "average" and decision.averaged_val_accuracy == pytest.approx(0.925)
    np.testing.assert_allclose(weight, np.full(3, 0.5))
    assert line.startswith("The fine-tuned weights were averaged with the head's")

    worse = [True] * 30 + [False] * 10  # 10 lost, none won: p = 0.002
    decision, weight, line = _decide("average", head, [worse, worse])
    assert decision.kept == "head" and decision.averaged_val_accuracy == pytest.approx(0.75)
    np.testing.assert_array_equal(weight, np.zeros(3))
    assert "clearly worse on validation" in line and "so the head's weights were kept" in line
