"""Review statistics on flowers: paired comparisons, calibration and "not sure" on foreign images.

    python bench/review_stats.py --data ../shared/datasets/flowers [--home /tmp/tlab-review-stats]
        [--train-only] [--out bench/results/review-stats.json]

Trains (once per data home; later calls reuse the finished runs) four small EfficientNet-Lite0
runs at 224 px on the same split: head only with seeds 0, 1 and 2, and head + fine-tune with seed 0.
Then measures, with tlcore's own functions:
  - the paired comparison of head-only vs fine-tuned and of the head-only seeds with each other,
    and the head-only seed group (mean ± std);
  - ECE on the test split before and after temperature scaling (fitted on val) for each run;
  - at each run's default threshold (95 % target precision on val): the share of the built-in
    digits and textures images it answers "not sure", against the share of flowers test images
    it still answers, and the accuracy of those answers.
Prints a markdown section for BENCHMARKS.md and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPES = {
    "head-s0": dict(head_epochs=10, seed=0),
    "head-s1": dict(head_epochs=10, seed=1),
    "head-s2": dict(head_epochs=10, seed=2),
    "finetune-s0": dict(head_epochs=10, finetune_epochs=2, finetune_layers=20,
                        augment=("flip", "rotate", "zoom"), seed=0),
}
FOREIGN = ("digits", "textures")


def train_runs(data: str, store) -> dict:
    """The finished run of each recipe, trained now if this data home has none yet."""
    from tlcore.data.importer import import_dataset
    from tlcore.queue import jobs
    from tlcore.records.config import TrainConfig

    names = {d.name for d in store.list_datasets()}
    if "flowers" in names:
        dataset = store.get_dataset("flowers")
    else:
        dataset = import_dataset(data, "flowers", store=store).dataset
    done = {r.name: r for r in store.list_runs() if r.status.value == "succeeded"}
    runs = {}
    for name, recipe in RECIPES.items():
        if name not in done:
            started = time.perf_counter()
            done[name] = jobs.run_foreground(TrainConfig(dataset=dataset.id, name=name, **recipe), store)
            print(f"[bench] trained {name} ({done[name].status.value}) in {time.perf_counter() - started:.0f} s",
                  flush=True)
        runs[name] = done[name]
    return runs


def abstention(run, folder: Path) -> dict:
    """Share answered "not sure" on built-in foreign images vs share answered on flowers test images."""
    from tlcore.data.builtin import materialize_builtin
    from tlcore.deploy import inference
    from tlcore.evaluate.evaluation import evaluate_run

    model = inference.load_run_model(run.id)
    out = {"threshold": model.threshold.threshold if model.threshold else None}
    for name in FOREIGN:
        files = sorted(p for p in materialize_builtin(name, folder).rglob("*.png"))
        preds = model.predict_files(files)
        out[name] = {"images": len(files), "not_sure": sum(p.abstained for p in preds) / len(files),
                     "over_90": sum(p.confidence >= 0.9 for p in preds) / len(files)}
    report = evaluate_run(run.id)
    files = list(report.predictions["path"])
    preds = model.predict_files(files)
    answered = [p for p in preds if not p.abstained]
    right = sum(p.label == t for p, t in zip(preds, report.predictions["true"]) if not p.abstained)
    out["flowers_test"] = {"images": len(files), "answered": len(answered) / len(files),
                           "accuracy_answered": right / len(answered) if answered else None,
                           "accuracy_all": report.accuracy}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "flowers"))
    parser.add_argument("--home", default=os.path.join(tempfile.gettempdir(), "tlab-review-stats"))
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "review-stats.json"))
    args = parser.parse_args()
    os.environ["TLCORE_HOME"] = args.home
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tlcore.records.store import Store

    store = Store()
    runs = train_runs(args.data, store)
    if args.train_only:
        return 0
    from tlcore.evaluate.comparison import compare_runs

    results: dict = {"runs": {}, "comparisons": {}, "abstention": {}}
    for name, run in runs.items():
        s = store.get_run(run.id).summary
        results["runs"][name] = {"id": run.id, "accuracy": s.metrics.accuracy, "macro_f1": s.metrics.macro_f1,
                                 "eval_images": s.eval_images, "calibration": {
                                     "temperature": s.calibration.temperature, "ece_before": s.calibration.ece_before,
                                     "ece_after": s.calibration.ece_after, "fitted_on": s.calibration.fitted_on},
                                 "threshold": {"threshold": s.threshold.threshold, "val_coverage": s.threshold.coverage,
                                               "val_precision": s.threshold.precision}}
    for a, b in (("head-s0", "finetune-s0"), ("head-s1", "finetune-s0"), ("head-s0", "head-s1"),
                 ("head-s1", "head-s2"), ("head-s0", "head-s2")):
        c = compare_runs(runs[a].id, runs[b].id, store=store)
        results["comparisons"][f"{a} vs {b}"] = {**c.to_json(), "verdict": c.verdict}
    from tlcore.evaluate.comparison import SeedGroup

    group = SeedGroup([store.get_run(runs[name].id) for name in ("head-s0", "head-s1", "head-s2")])
    results["seed_group"] = {"runs": [r.name for r in group.runs], "accuracy": group.mean_std("accuracy"),
                             "macro_f1": group.mean_std("macro_f1")}
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in runs.items():
            results["abstention"][name] = abstention(run, Path(tmp))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(markdown(results))
    return 0


def markdown(r: dict) -> str:
    lines = ["## Review statistics: paired comparisons, calibration, \"not sure\" (flowers)", "",
             "Written by `bench/review_stats.py`; EfficientNet-Lite0, ImageNet weights, 224 px, the import's "
             "stratified split (seed 0); head 10 epochs; fine-tune: + 2 epochs of the top 20 layers with "
             "flip/rotate/zoom.", "",
             "| run | test accuracy | macro F1 | T | ECE before | ECE after | threshold | val coverage |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, x in r["runs"].items():
        c, t = x["calibration"], x["threshold"]
        lines.append(f"| {name} | {x['accuracy']:.4f} | {x['macro_f1']:.4f} | {c['temperature']:.2f} | "
                     f"{c['ece_before']:.4f} | {c['ece_after']:.4f} | {t['threshold']:.3f} | {t['val_coverage']:.1%} |")
    lines += ["", "Paired comparisons on the shared test images (bootstrap 2,000 resamples, seed 0; McNemar exact):",
              "",
              "| A vs B | shared | acc A | acc B | delta | 95 % CI | McNemar p | fixed | broken | both wrong |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c in r["comparisons"].items():
        lines.append(f"| {name} | {c['n_shared']} | {c['acc_a']:.4f} | {c['acc_b']:.4f} | "
                     f"{100 * c['delta']:+.2f} pts | "
                     f"{100 * c['ci_low']:+.2f} to {100 * c['ci_high']:+.2f} | {c['mcnemar_p']:.3g} | {c['fixed']} | "
                     f"{c['broken']} | {c['both_wrong']} |")
    g = r["seed_group"]
    lines += ["", f"Seed group {', '.join(g['runs'])}: test accuracy {g['accuracy'][0]:.4f} ± {g['accuracy'][1]:.4f}, "
              f"macro F1 {g['macro_f1'][0]:.4f} ± {g['macro_f1'][1]:.4f} (mean ± std).", "", "Verdicts:", ""]
    lines += [f"- {k}: \"{c['verdict']}\"" for k, c in r["comparisons"].items()]
    lines += ["",
              "At each run's default threshold (95 % target precision on val, after temperature scaling):", "",
              "| run | digits: not sure | textures: not sure | digits/textures >= 90 % conf. | flowers test answered | "
              "accuracy of answers | accuracy, all |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, x in r["abstention"].items():
        f = x["flowers_test"]
        lines.append(f"| {name} | {x['digits']['not_sure']:.1%} | {x['textures']['not_sure']:.1%} | "
                     f"{x['digits']['over_90']:.1%} / {x['textures']['over_90']:.1%} | {f['answered']:.1%} | "
                     f"{f['accuracy_answered']:.4f} | {f['accuracy_all']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
