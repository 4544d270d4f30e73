"""Issue 21: the default recipe vs the Keras tutorial recipe on several real photo sets, 3 seeds.

    python bench/defaults.py DATA_FOLDER [DATA_FOLDER ...] [--seeds 0,1,2] [--image-size 128]
        [--head-epochs 5] [--finetune-epochs 2] [--max-images 240] [--recipes tutorial,default]
        [--set FIELD=VALUE ...] [--against EARLIER_WORKDIR]
    python bench/defaults.py --report [--results A.json,B.json]   # the BENCHMARKS.md section from results files

Each folder is a photo set, one sub-folder per class; a set laid out as `train/` and `val/`
(hymenoptera) is pooled first (split folders named train, val, valid or test; another top-level
folder, such as the clothing set's `validation/`, is left out, as in every measurement so far). With
`--max-images` each class keeps the same share of its images (a seeded sample), so a set's natural
imbalance stays. The set is imported once (tlcore's stratified 70/15/15 split) into its own data
home; both recipes train on that split:

- "default": `TrainConfig`'s defaults (class weighting auto, head search auto, the fine-tune on
  cached activations, its result the head's and the fine-tuned weights averaged) with the bench's epochs,
  size, batch 32, lr 1e-3, dropout 0.2, flip/rotate/zoom asked for in the fine-tune (on cached
  activations only the flip reaches it);
- "tutorial": `bench/baseline.py` (the Keras transfer-learning tutorial), same epochs, size,
  batch, lr, dropout and augmentation.

Every run is its own process (`bench/run.py`'s `measure`), whose wall and CPU time (user + system
of the process and the processes it waited for) are kept with its result in the workdir. The seed
changes initialisation, batch order and augmentation, not the split. Per set: mean ± std over seeds
of test accuracy and macro F1, wall and CPU seconds of each side's whole process (CPU time is the
figure other load on a shared machine disturbs least) and where each side's time went; the paired
verdict (`tlcore.evaluate.comparison.compare_predictions`) pools the seeds' test predictions (each image
once per seed). One more default run per set with
`--head-search off --class-weight none`, head only, times the single head fit the search is
held against (both on warm feature caches: `head_s - features_s`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.run import (  # noqa: E402
    AUGMENT,
    IMAGE_SUFFIXES,
    import_into,
    machine,
    measure,
    prepare_weights,
    split_folders,
)

RESULTS = REPO / "bench" / "results" / "defaults.json"
# Both recipes' settings besides size, epochs and augmentation.
RECIPE = dict(finetune_layers=20, batch_size=32, lr=1e-3, dropout=0.2)
TITLE = "## Defaults vs the tutorial recipe on several photo sets (issue 21)"


def class_files(source: Path) -> dict[str, list[Path]]:
    """Images per class of `source`: class folders at the top, or under split folders (train/, val/, ...)."""
    splits = [p for p in source.iterdir() if p.is_dir() and p.name in ("train", "val", "valid", "test")]
    files: dict[str, list[Path]] = {}
    for root in splits or [source]:
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            files.setdefault(class_dir.name, []).extend(
                sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
    return files


def sampled_copy(source: Path, dest: Path, max_images: int | None, seed: int = 0) -> dict[str, int]:
    """The same seeded share of every class of `source` (at most `max_images` in all) copied flat into `dest`."""
    files = class_files(source)
    total = sum(len(f) for f in files.values())
    share = min(1.0, max_images / total) if max_images else 1.0
    rng = np.random.default_rng(seed)
    counts = {}
    for label, paths in files.items():
        size = min(len(paths), max(8, round(len(paths) * share)))
        keep = sorted(rng.choice(len(paths), size=size, replace=False))
        (dest / label).mkdir(parents=True, exist_ok=True)
        for i in keep:
            shutil.copy2(paths[i], dest / label / f"{i:05d}{paths[i].suffix.lower()}")
        counts[label] = len(keep)
    return counts


def mean_std(values) -> dict:
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def run_set(source: Path, args, workdir: Path) -> dict:
    """Both recipes, every seed, on one photo set; the numbers for its table row."""
    import pandas as pd

    from tlcore.evaluate.comparison import compare_predictions
    from tlcore.evaluate.evaluation import read_predictions

    name = source.name
    home, sample = workdir / f"home-{name}", workdir / f"source-{name}"
    if (home / "runs").is_dir():  # set up by an earlier invocation with this --workdir
        dataset, entries = _imported(home, name)
        counts = {d.name: len(list(d.iterdir())) for d in sorted(sample.iterdir())}
    else:
        counts = sampled_copy(source, sample, args.max_images)
        dataset, entries, _ = import_into(home, sample, name)
        prepare_weights(home, template=args.weights_home)
    args.weights_home = args.weights_home or home
    split_dir = workdir / f"splits-{name}"
    if not split_dir.is_dir():
        split_folders(entries, split_dir)
    labels = list(dataset.classes)

    def run(task: str, task_args: dict, label: str) -> dict | None:
        """A finished measurement from this workdir, else measured now (None with --finished-only)."""
        done = _measured(workdir, label)
        if done.exists():
            return json.loads(done.read_text())
        if args.finished_only or task_recipe(task) not in args.recipes:
            return None
        result = measure(task, task_args, home, workdir, label)
        done.write_text(json.dumps(result))  # with the process's wall and CPU time, which the worker cannot know
        return result

    common = dict(head_epochs=args.head_epochs, finetune_epochs=args.finetune_epochs, **RECIPE)
    sides: dict[str, list[dict]] = {"tutorial": [], "default": []}
    preds: dict[str, list[pd.DataFrame]] = {"tutorial": [], "default": []}
    for seed in args.seeds:
        tutorial = run("baseline", dict(split_dir=str(split_dir), labels=labels, size=args.image_size,
                                        seed=seed, eval_split="test", **common), f"{name}-tutorial-{seed}")
        default = run("tlcore", {"config": default_config(dataset.id, seed=seed, image_size=args.image_size,
                                                          head_epochs=args.head_epochs,
                                                          finetune_epochs=args.finetune_epochs, **args.set)},
                      f"{name}-default-{seed}")
        if tutorial is None or default is None:
            continue
        for side, result, table in (
                ("tutorial", tutorial, pd.DataFrame(tutorial.pop("predictions"))),
                ("default", default, read_predictions(home / "runs" / default["run_id"] / "predictions.jsonl"))):
            table["path"] = [f"seed{seed}:{Path(p).stem}" for p in table["path"]]  # each image once per seed
            preds[side].append(table)
            sides[side].append(_row(side, result))
    if not sides["default"]:
        return None
    reference = run("tlcore", {"config": dict(dataset=dataset.id, image_size=args.image_size, seed=0,
                                              head_search="off", class_weight="none",
                                              **{**common, "finetune_epochs": 0})}, f"{name}-single-head")
    paired = compare_predictions(pd.concat(preds["tutorial"]), pd.concat(preds["default"]), labels,
                                 name_a="tutorial", name_b="default")
    against = _against(Path(args.against), name, args.seeds, pd.concat(preds["default"]), labels) \
        if args.against else None
    return {"name": name, "source": str(source), "images": len(entries), "class_counts": counts,
            "splits": {s: sum(e.split == s for e in entries) for s in ("train", "val", "test")},
            "seeds": [seed for seed in args.seeds if _measured(workdir, f"{name}-default-{seed}").exists()
                      and _measured(workdir, f"{name}-tutorial-{seed}").exists()],
            "runs": sides, "single_head": _row("default", reference) if reference else None,
            "paired": paired.to_json(), "against": against}


def default_config(dataset_id: str, *, seed: int, image_size: int, head_epochs: int, finetune_epochs: int,
                   **overrides) -> dict:
    """The default side's recipe: TrainConfig's defaults with the bench's size, epochs, `RECIPE` and
    augmentation (what the tutorial side does too), `overrides` over them."""
    return {**dict(dataset=dataset_id, image_size=image_size, seed=seed, augment=list(AUGMENT),
                   head_epochs=head_epochs, finetune_epochs=finetune_epochs, **RECIPE), **overrides}


def recipe_settings(items: list[str]) -> dict:
    """`--set FIELD=VALUE` items as recipe fields: a number, list or boolean as JSON reads it, else the
    text itself."""
    settings = {}
    for item in items:
        field, value = item.split("=", 1)
        try:
            settings[field] = json.loads(value)
        except json.JSONDecodeError:
            settings[field] = value
    return settings


def task_recipe(task: str) -> str:
    """The recipe a `bench/run.py` task measures."""
    return {"baseline": "tutorial", "tlcore": "default"}[task]


def _against(earlier: Path, name: str, seeds, predictions, labels) -> dict | None:
    """This set's default runs in the workdir `earlier` (same split, an earlier default recipe), and the
    paired verdict of this workdir's default against them, seeds pooled."""
    import pandas as pd

    from tlcore.evaluate.comparison import compare_predictions
    from tlcore.evaluate.evaluation import read_predictions

    rows, tables = [], []
    for seed in seeds:
        done = _measured(earlier, f"{name}-default-{seed}")
        if not done.exists():
            continue
        result = json.loads(done.read_text())
        table = read_predictions(earlier / f"home-{name}" / "runs" / result["run_id"] / "predictions.jsonl")
        table["path"] = [f"seed{seed}:{Path(p).stem}" for p in table["path"]]
        rows.append(_row("default", result))
        tables.append(table)
    if not rows:
        return None
    paired = compare_predictions(pd.concat(tables), predictions, labels, name_a="earlier default", name_b="default")
    return {"workdir": str(earlier), "runs": rows, "paired": paired.to_json()}


def _measured(workdir: Path, label: str) -> Path:
    return workdir / f"{label}.measured.json"


def _imported(home: Path, name: str):
    """The dataset `name` already imported into data home `home`, and its manifest entries."""
    os.environ["TLCORE_HOME"] = str(home)
    from tlcore.data.manifest import load_manifest
    from tlcore.records.store import Store

    dataset = next(d for d in Store().list_datasets() if d.name == name)
    return dataset, load_manifest(dataset.id)


def _row(side: str, result: dict) -> dict:
    # cpu_s: user + system seconds of the side's process and the processes it waited for (`measure`'s wait4).
    if side == "tutorial":
        return {"accuracy": result["accuracy"], "macro_f1": result["macro_f1"],
                "total_s": result["timings"]["total_s"], "process_s": result.get("process_wall_s"),
                "cpu_s": result.get("cpu_s"), "others_cpu_share": result.get("others_cpu_share"),
                "timings": result["timings"]}
    summary = result["summary"]
    timings = summary["timings"]
    search = summary.get("head_search") or {}
    trials = search.get("trials") or []
    chosen = trials[search["chosen"]] if trials else None
    return {"accuracy": result["accuracy"], "macro_f1": result["macro_f1"], "total_s": timings["total_s"],
            "process_s": result.get("process_wall_s"), "cpu_s": result.get("cpu_s"),
            "others_cpu_share": result.get("others_cpu_share"), "timings": timings,
            "head_fit_s": (timings.get("head_s") or 0) - (timings.get("features_s") or 0),
            "features_reused": timings.get("features_reused"), "chosen": chosen, "trials": len(trials),
            "class_weight": summary.get("class_weight"), "class_weight_scores": search.get("class_weight"),
            "finetune": summary.get("finetune"), "finetune_inputs": summary.get("finetune_inputs")}


# ---------------------------------------------------------------- report


def _ms(stat: dict, digits: int = 3) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _speedups(s: dict, key: str) -> str:
    """Tutorial / default of `key` (seconds): the ratio of the means, then per seed."""
    tutorial, default = s["runs"]["tutorial"], s["runs"]["default"]
    if any(r.get(key) is None for r in tutorial + default):
        return "not measured"
    means = statistics.fmean(r[key] for r in tutorial) / statistics.fmean(r[key] for r in default)
    return f"**{means:.1f}×**; " + ", ".join(f"{t[key] / d[key]:.1f}×" for t, d in zip(tutorial, default))


def _steps(row: dict, side: str) -> dict[str, float]:
    """Where one run's wall time went: start-up outside the timed run, then the run's own steps."""
    t = row["timings"]
    outside = (row["process_s"] or t["total_s"]) - t["total_s"]
    if side == "tutorial":  # setup_s: TensorFlow import, datasets, model build
        steps = {"start-up": outside, "setup": t["setup_s"], "head": t["head_s"], "fine-tune": t["finetune_s"],
                 "eval": t["eval_s"]}
    else:  # head_s holds the features (when not reused) and the head search
        get = {k: t.get(k) or 0.0 for k in ("pixels_s", "features_s", "head_s", "finetune_s", "eval_s")}
        steps = {"start-up": outside, "decode": get["pixels_s"], "features": get["features_s"],
                 "head": get["head_s"] - get["features_s"], "fine-tune": get["finetune_s"], "eval": get["eval_s"]}
    steps["other"] = (row["process_s"] or t["total_s"]) - sum(steps.values())
    return steps


def report(results: dict) -> str:
    cfg = results["config"]
    lines = [TITLE, "",
             f"Measured {results['date']} with `{results['command']}` ("
             + (f"load average {results['load_average']:.1f} on {os.cpu_count()} cores when the command started; "
                if results.get("load_average") is not None else "") +
             "how much of the cores other processes used while each side ran is in the second table: where it is "
             "high, wall seconds say more about the load than the recipe; in each seed the two recipes ran one "
             "after the other, so the speed-up is given per seed as well).",
             f"Scale: {cfg['image_size']} px, head {cfg['head_epochs']} + fine-tune {cfg['finetune_epochs']} epochs "
             f"for both recipes, at most {cfg['max_images']} images per set (each class the same share of its "
             f"images, so the natural imbalance stays), seeds {', '.join(map(str, cfg['seeds']))}; test split of "
             "tlcore's stratified 70/15/15 split, the same images for both recipes. Seconds are each side's whole "
             "process, start-up included: wall, and CPU (user + system of the process and the processes it "
             "waited for, from `wait4`), the figure other sessions' load disturbs least. Speed-up = tutorial / "
             "default, bold: of the means over seeds.", "",
             "| set | images (classes, largest:smallest) | tutorial accuracy | default accuracy | tutorial macro F1 "
             "| default macro F1 | wall s tutorial / default | CPU s tutorial / default | speed-up, wall "
             "| speed-up, CPU | paired verdict (seeds pooled) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in results["sets"]:
        stats = {side: {k: mean_std(r[k] for r in runs) for k in ("accuracy", "macro_f1")}
                 for side, runs in s["runs"].items()}
        mean = {side: {k: statistics.fmean(r.get(k) or 0.0 for r in runs) for k in ("process_s", "cpu_s")}
                for side, runs in s["runs"].items()}
        counts = s["class_counts"]
        lines.append(
            f"| {s['name']} (seeds {', '.join(map(str, s.get('seeds', cfg['seeds'])))}) "
            f"| {s['images']} ({len(counts)}, {max(counts.values())}:{min(counts.values())}) "
            f"| {_ms(stats['tutorial']['accuracy'])} | {_ms(stats['default']['accuracy'])} "
            f"| {_ms(stats['tutorial']['macro_f1'])} | {_ms(stats['default']['macro_f1'])} "
            f"| {mean['tutorial']['process_s']:.0f} / {mean['default']['process_s']:.0f} "
            f"| {mean['tutorial']['cpu_s']:.0f} / {mean['default']['cpu_s']:.0f} "
            f"| {_speedups(s, 'process_s')} | {_speedups(s, 'cpu_s')} | {s['paired']['verdict']} |")
    lines += ["", "Where each side's wall time went (seconds, mean over seeds; start-up: process start and imports "
              "before the timed run; other processes' CPU: the share of the machine's cores other processes used "
              "while the side ran, mean over seeds):", "",
              "| set | side | start-up | tutorial setup | decode | features | head | fine-tune | eval | other "
              "| whole process | other processes' CPU |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in results["sets"]:
        for side in ("tutorial", "default"):
            runs = [r for r in s["runs"][side] if r.get("timings")]
            if not runs:
                continue
            steps = [_steps(r, side) for r in runs]
            shown = [f"{statistics.fmean(st[k] for st in steps):.0f}" if k in steps[0] else "-" for k in
                     ("start-up", "setup", "decode", "features", "head", "fine-tune", "eval", "other")]
            others = [r["others_cpu_share"] for r in runs if r.get("others_cpu_share") is not None]
            lines.append(f"| {s['name']} | {side} | " + " | ".join(shown) +
                         f" | {statistics.fmean(r['process_s'] or 0.0 for r in runs):.0f} | "
                         + (f"{statistics.fmean(others):.0%}" if others else "-") + " |")
    lines += ["", "What the default recipe chose per run (head search on cached features, class weighting auto, "
              "the fine-tune's result: average, finetune or head as the run's `finetune_result` chose), and its head "
              "phase against one plain head fit on the same warm feature cache:", "",
              "| set | seed | chosen head (lr, dropout, smoothing, class weight) | val macro F1 none / balanced "
              "| fine-tune | head phase s (search) | single head fit s |", "|---|---|---|---|---|---|---|"]
    for s in results["sets"]:
        for seed, r in zip(s.get("seeds", results["config"]["seeds"]), s["runs"]["default"]):
            c = r["chosen"]
            head = (f"{c['lr']:g}, {c['dropout']:g}, {c['label_smoothing']:g}, {c['class_weight']} "
                    f"(of {r['trials']})") if c else "-"
            ft = r.get("finetune") or {}
            averaged = f", averaged {ft['averaged_val_accuracy']:.3f}" if ft.get("averaged_val_accuracy") else ""
            ft_text = (f"kept {ft['kept']} (val acc {ft['head_val_accuracy']:.3f} → {ft['finetune_val_accuracy']:.3f}"
                       f"{averaged})" if ft else "-")
            ft_text += ", on cached activations" if r.get("finetune_inputs") == "cached" else ""
            single = f"{s['single_head']['head_fit_s']:.1f}" if s.get("single_head") else "not run"
            lines.append(f"| {s['name']} | {seed} | {head} | {_cw_scores(r)} | {ft_text} | "
                         f"{r['head_fit_s']:.1f}{'' if r['features_reused'] else ' (features computed)'} | {single} |")
    against = [s for s in results["sets"] if s.get("against")]
    if against:
        lines += ["", "The default recipe against the earlier default measured on the same splits and seeds (its "
                  f"runs in `{against[0]['against']['workdir']}` and the like; `--against`), paired verdict seeds "
                  "pooled:", "",
                  "| set | earlier default accuracy | default accuracy | earlier macro F1 | default macro F1 "
                  "| CPU s earlier / default | paired verdict (seeds pooled) |", "|---|---|---|---|---|---|---|"]
        for s in against:
            earlier, now = s["against"]["runs"], s["runs"]["default"]
            stat = {(side, k): mean_std(r[k] for r in runs) for side, runs in (("earlier", earlier), ("now", now))
                    for k in ("accuracy", "macro_f1")}
            cpu = {side: statistics.fmean(r.get("cpu_s") or 0.0 for r in runs)
                   for side, runs in (("earlier", earlier), ("now", now))}
            lines.append(f"| {s['name']} | {_ms(stat['earlier', 'accuracy'])} | {_ms(stat['now', 'accuracy'])} "
                         f"| {_ms(stat['earlier', 'macro_f1'])} | {_ms(stat['now', 'macro_f1'])} "
                         f"| {cpu['earlier']:.0f} / {cpu['now']:.0f} | {s['against']['paired']['verdict']} |")
    return "\n".join(lines) + "\n"


def _cw_scores(row: dict) -> str:
    scores = row.get("class_weight_scores")
    if not scores:
        return row.get("class_weight") or "-"
    return f"{scores['none_val_macro_f1']:.3f} / {scores['balanced_val_macro_f1']:.3f} → {scores['chosen']}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="*", help="photo set folders (one sub-folder per class)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--head-epochs", type=int, default=5)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--max-images", type=int, default=240)
    p.add_argument("--workdir", help="where the data homes and each run's result go (default: a new temporary "
                                     "folder); a run whose result is already there is not run again")
    p.add_argument("--recipes", default="tutorial,default",
                   help="the recipes to run now (a run of another recipe is only read back when finished), e.g. "
                        "tutorial: its runs, which no change to tlcore alters, first")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a recipe field over TrainConfig's default on the default side, e.g. finetune_views=4, to "
                        "measure a candidate default against the current one (with --against); repeatable")
    p.add_argument("--finished-only", action="store_true",
                   help="start no run: report the runs already finished in --workdir")
    p.add_argument("--against", help="an earlier workdir of the same sets: its default runs are compared with "
                                      "this one's (paired, seeds pooled)")
    p.add_argument("--report", action="store_true", help="write the BENCHMARKS.md section from the results file")
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    p.add_argument("--results", default=str(RESULTS), help="the results file (sets already in it at the same "
                                                            "scale are kept)")
    args = p.parse_args(argv)
    if args.report:  # several results files (comma list): their sets in one table
        parts = [json.loads(Path(f).read_text()) for f in args.results.split(",")]
        merged = {**parts[0], "sets": [s for part in parts for s in part["sets"]],
                  "command": " & ".join(part["command"] for part in parts),
                  "date": " and ".join(dict.fromkeys(part["date"] for part in parts))}
        _write_section(Path(args.out), report(merged))
        return
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.recipes = args.recipes.split(",")
    args.set = recipe_settings(args.set)
    args.weights_home = None
    command = "python bench/defaults.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="tldefaults-"))
    print(f"[defaults] working in {workdir}", flush=True)
    config = {"seeds": args.seeds, "image_size": args.image_size, "head_epochs": args.head_epochs,
              "finetune_epochs": args.finetune_epochs, "max_images": args.max_images}
    results = {"date": _now(), "command": command, "machine": machine(), "sets": [], "config": config,
               "load_average": os.getloadavg()[1]}
    if args.finished_only:  # the runs were measured earlier: when, not the load now
        results["date"], results["load_average"] = _span(workdir), None
    results_path = Path(args.results)
    if results_path.exists():
        # Sets measured earlier at the same scale stay; a set measured again replaces its row.
        earlier = json.loads(results_path.read_text())
        if earlier.get("config") == config:
            results["sets"] = earlier["sets"]
            results["command"] = earlier["command"] + " ; " + command
    for folder in args.data:
        row = run_set(Path(folder).resolve(), args, workdir)
        if row is None:
            print(f"[defaults] {folder}: no seed finished both recipes yet", flush=True)
            continue
        results["sets"] = [s for s in results["sets"] if s["name"] != row["name"]] + [row]
        results_path.write_text(json.dumps(results, indent=1, default=str))  # what is done so far survives a stop
        print(f"[defaults] {folder}: done", flush=True)
    _write_section(Path(args.out), report(results))
    print(report(results), flush=True)


def _now(when: datetime.datetime | None = None) -> str:
    return (when or datetime.datetime.now()).astimezone().strftime("%Y-%m-%d %H:%M %Z")


def _span(workdir: Path) -> str:
    """From the first to the last run finished in `workdir`."""
    ends = sorted(p.stat().st_mtime for p in workdir.glob("*.measured.json"))
    if not ends:
        return _now()
    first, last = (datetime.datetime.fromtimestamp(t) for t in (ends[0], ends[-1]))
    return f"{_now(first)} to {last.astimezone().strftime('%H:%M %Z')} (runs finished)"


def _write_section(out: Path, section: str) -> None:
    """Replace (or add) this benchmark's section of BENCHMARKS.md, keeping every other section."""
    text = out.read_text() if out.exists() else ""
    head, _, rest = text.partition(TITLE)
    after = rest[rest.find("\n## "):] if "\n## " in rest else ""
    out.write_text(head.rstrip("\n") + "\n\n" + section + after if head else section + after)


if __name__ == "__main__":
    main()
