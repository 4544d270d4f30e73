"""Transfer Lab benchmark: the Keras tutorial recipe vs tlcore, side by side, on the same data.

    python bench/run.py --data ../shared/datasets/flowers [--image-size 224] [--head-epochs 5]
        [--finetune-epochs 2] [--limit-per-class N] [--out BENCHMARKS.md] [--smoke]

Every measured side runs in its own subprocess (`bench/worker.py`), one after the other, with
its own peak memory (RSS of the process tree, polled with psutil, and the child's ru_maxrss).
Each tlcore run gets a fresh `$TLCORE_HOME` under a temporary folder (cold pixel and feature
caches), except the "features cached" side: the same job again, in its own process, in the main
run's data home, so its pixel and feature caches are warm (what every later run on the same
dataset, backbone, size and weights pays). The markdown report is written by this script from
the numbers it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tlcore.records.run_record import RunSummary, Timings  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
AUGMENT = ("flip", "rotate", "zoom")


# ---------------------------------------------------------------- running one side


def measure(task: str, args: dict, home: Path, workdir: Path, label: str, memory_cap=None) -> dict:
    """Run `bench/worker.py task` in a subprocess; return its result plus wall time and peak memory.

    With `memory_cap` (a `bench.memcap.MemoryCap`), the subprocess runs inside that memory limit.
    """
    args_path, result_path = workdir / f"{label}.args.json", workdir / f"{label}.result.json"
    log_path = workdir / f"{label}.log"
    args_path.write_text(json.dumps(args))
    env = {**os.environ, "TLCORE_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(REPO / "bench" / "worker.py"), task, str(args_path), str(result_path)]
    print(f"[bench] {label}: running ({task}) ...", flush=True)
    started = time.perf_counter()
    cpu_before = psutil.cpu_times()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO),
                                preexec_fn=memory_cap.enter if memory_cap else None)
        peak_rss = peak_anon = 0
        root = psutil.Process(proc.pid)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            rss = anon = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    info = p.memory_info()
                    rss += info.rss
                    anon += info.rss - info.shared
            except psutil.Error:
                pass
            peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    cpu_after = psutil.cpu_times()
    busy = sum(getattr(cpu_after, f) - getattr(cpu_before, f) for f in ("user", "nice", "system", "irq", "softirq", "steal")
               if hasattr(cpu_after, f))
    own_cpu = usage.ru_utime + usage.ru_stime
    if proc.returncode != 0 or not result_path.exists():
        tail = "".join(log_path.read_text(errors="replace").splitlines(True)[-40:])
        raise RuntimeError(f"{label} failed (exit {proc.returncode}); last lines of {log_path}:\n{tail}")
    result = json.loads(result_path.read_text())
    result["process_wall_s"] = wall
    result["peak_rss_mb"] = max(peak_rss, usage.ru_maxrss * 1024) / 2**20
    result["peak_rss_polled_mb"] = peak_rss / 2**20
    result["peak_anon_mb"] = peak_anon / 2**20
    result["cpu_s"] = own_cpu
    # CPU time other processes on the machine used while this side ran, as a share of all cores.
    result["others_cpu_share"] = max(0.0, busy - own_cpu) / (wall * (os.cpu_count() or 1))
    print(f"[bench] {label}: done in {wall:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB, "
          f"CPU {own_cpu:.0f} s, other processes used {result['others_cpu_share']:.0%} of the cores", flush=True)
    return result


def measure_once(task: str, args: dict, home: Path, workdir: Path, label: str) -> dict:
    """`measure`, unless `workdir` holds this label's result already (`LABEL.done.json`): then that result,
    read back, so a bench stopped part way goes on where it stopped."""
    done = workdir / f"{label}.done.json"
    if done.exists():
        return json.loads(done.read_text())
    result = measure(task, args, home, workdir, label)
    done.write_text(json.dumps(result))
    return result


def measure_capped(tl: dict, pixel_cache_mb: float, source: Path, home: Path, workdir: Path, tl_config,
                   skip: str | None = None) -> dict:
    """The whole job again, cold, under a memory limit that leaves room for only a quarter of its
    pixel cache beside the job's anonymous peak: it must stream the rest from disk. With `skip`,
    only the limit is worked out and the report says why the run was not made."""
    from bench.memcap import MemoryCap

    limit_mb = int(math.ceil((tl["peak_anon_mb"] + pixel_cache_mb / 4) / 50) * 50)
    out = {"limit_mb": limit_mb, "pixel_cache_mb": pixel_cache_mb, "uncapped_s": summary_of(tl).timings.total_s}
    if skip:
        return {**out, "skipped": skip}
    try:
        cap = MemoryCap(limit_mb, f"tlbench-{os.getpid()}")
    except OSError as exc:
        return {**out, "skipped": f"no memory limit could be set here ({exc})"}
    try:
        capped_home = workdir / "home-capped"
        dataset, _, _ = import_into(capped_home, source, "bench-capped")
        prepare_weights(capped_home, template=home)
        try:
            res = measure("tlcore", {"config": tl_config(dataset.id)}, capped_home, workdir, "capped", memory_cap=cap)
            out.update(finished=True, accuracy=res["accuracy"], total_s=summary_of(res).timings.total_s,
                       peak_anon_mb=res["peak_anon_mb"])
        except RuntimeError as exc:
            out.update(finished=False, error=str(exc).splitlines()[0])
        out.update(cap.stats())
        return out
    finally:
        cap.close()


# ---------------------------------------------------------------- data


def subset_copy(source: Path, dest: Path, *, per_class: int | None = None, fraction: float | None = None) -> Path:
    """Copy the first `per_class` (or `fraction` of each class's) images, by sorted name, into `dest`."""
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        n = per_class if per_class is not None else math.ceil(len(files) * fraction)
        (dest / class_dir.name).mkdir(parents=True, exist_ok=True)
        for f in files[:n]:
            shutil.copy2(f, dest / class_dir.name / f.name)
    return dest


def import_into(home: Path, source: Path, name: str):
    """Import `source` as a dataset in data home `home` (in this process); return (dataset, entries, seconds)."""
    os.environ["TLCORE_HOME"] = str(home)
    from tlcore.data.importer import import_dataset
    from tlcore.data.manifest import load_manifest
    from tlcore.records.store import Store

    t = time.perf_counter()
    dataset = import_dataset(source, name=name, store=Store()).dataset
    seconds = time.perf_counter() - t
    return dataset, load_manifest(dataset.id), seconds


def prepare_weights(home: Path, template: Path | None = None) -> Path:
    """Put the converted Lite0 weights in `home` before any timed run, so neither side pays the
    one-time conversion (copied from `template`'s data home when given)."""
    target = home / "weights"
    if template is not None and (template / "weights").is_dir():
        shutil.copytree(template / "weights", target, dirs_exist_ok=True)
        return target
    env = {**os.environ, "TLCORE_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "2"}
    subprocess.run([sys.executable, "-c", "from tlcore.backbones.efficientnet_lite import imagenet_weights; "
                    "imagenet_weights()"], env=env, cwd=str(REPO), check=True, capture_output=True)
    return target


def split_folders(entries, dest: Path) -> Path:
    """`dest/<split>/<class>/<file>` symlinks to the manifest's images: tlcore's split, for the baseline."""
    for i, e in enumerate(entries):
        folder = dest / e.split / e.label
        folder.mkdir(parents=True, exist_ok=True)
        suffix = Path(e.source).suffix or Path(e.path).suffix or ".jpg"
        (folder / f"{i:05d}{suffix.lower()}").symlink_to(e.path)
    return dest


# ---------------------------------------------------------------- analysis


def summary_of(result: dict) -> RunSummary:
    """The typed summary of a tlcore measurement (results files keep it as JSON)."""
    return RunSummary.from_dict(result["summary"])


def first_reaching(epochs: list[dict], target: float, phases=("head", "finetune")) -> dict | None:
    """The first epoch (in `phases`) whose val_accuracy >= target, or None."""
    for e in epochs:
        if e["phase"] in phases and e.get("val_accuracy", -1) >= target - 1e-9:
            return e
    return None


def last_of(epochs: list[dict], phase: str) -> dict | None:
    rows = [e for e in epochs if e["phase"] == phase]
    return rows[-1] if rows else None


def machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import importlib.metadata as md

    return {"nproc": os.cpu_count(), "cpu_model": model, "ram_gib": psutil.virtual_memory().total / 2**30,
            "python": platform.python_version(), "tensorflow": md.version("tensorflow"),
            "keras": md.version("keras"), "platform": platform.platform()}


def fmt(v, digits=1, unit=""):
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    return f"{v:,.{digits}f}{unit}"


def ratio(a, b, digits=2):
    if a is None or b is None or not b:
        return "—"
    return f"{a / b:.{digits}f}×"


# ---------------------------------------------------------------- report


def build_report(r: dict) -> str:
    cfg, base, tl, probe = r["config"], r["baseline"], r["tlcore"], r["probe"]
    bt, tt = base["timings"], summary_of(tl).timings
    head_target = (last_of(base["epochs"], "head") or {}).get("val_accuracy")
    final_target = (base["epochs"][-1] if base["epochs"] else {}).get("val_accuracy")
    b_head_hit = first_reaching(base["epochs"], head_target, ("head",)) if head_target is not None else None
    t_head_hit = first_reaching(tl["epochs"], head_target, ("head",)) if head_target is not None else None
    b_final_hit = first_reaching(base["epochs"], final_target) if final_target is not None else None
    t_final_hit = first_reaching(tl["epochs"], final_target) if final_target is not None else None
    tl_head_wall = (tt.pixels_s or 0) + (tt.head_s or 0)
    b_head_val = head_target
    t_head_val = (last_of(tl["epochs"], "head") or {}).get("val_accuracy")
    t_final_val = (tl["epochs"][-1] if tl["epochs"] else {}).get("val_accuracy")
    t = lambda hit: hit["elapsed_s"] if hit else None  # noqa: E731
    # The "features cached" side: the same tlcore job again in the main run's data home (warm
    # pixel and feature caches). Absent from results saved before it was measured.
    warm = r.get("tlcore_warm")
    wt = summary_of(warm).timings if warm else Timings()
    w_head_wall = ((wt.pixels_s or 0) + (wt.head_s or 0)) if warm else None
    w_head_hit = first_reaching(warm["epochs"], head_target, ("head",)) if warm and head_target is not None else None
    w_any_hit = first_reaching(warm["epochs"], head_target) if warm and head_target is not None else None
    w_final_hit = first_reaching(warm["epochs"], final_target) if warm and final_target is not None else None
    w_head_val = (last_of(warm["epochs"], "head") or {}).get("val_accuracy") if warm else None
    w_final_val = (warm["epochs"][-1] if warm and warm["epochs"] else {}).get("val_accuracy")
    wget = lambda key: warm[key] if warm else None  # noqa: E731

    def reached(hit, side_present=True):
        if not side_present:
            return "—"
        return fmt(t(hit)) if hit else "not reached"

    L = []
    L.append("# Benchmarks: Transfer Lab (tlcore) vs the Keras tutorial recipe\n")
    L.append("Written by `bench/run.py`; every number below was measured and printed by that run.\n")
    m = r["machine"]
    L.append(f"- **Date**: {r['date']}")
    L.append(f"- **Machine**: {m['nproc']} CPU cores ({m['cpu_model']}), {m['ram_gib']:.1f} GiB RAM, no GPU; "
             f"{m['platform']}; Python {m['python']}, TensorFlow {m['tensorflow']}, Keras {m['keras']}")
    L.append(f"- **Command**: `{r['command']}`")
    L.append(f"- **Data**: `{cfg['data']}`: {r['images']} images, {len(r['classes'])} classes; tlcore's "
             f"stratified split (seed 0): {r['split_counts']}. Both sides train on `train`, validate on `val` "
             f"and are scored on `{summary_of(tl).eval_split}` ({summary_of(tl).eval_images} images).")
    L.append(f"- **Recipe (both sides)**: EfficientNet-Lite0, ImageNet weights, {cfg['image_size']} px, batch "
             f"{cfg['batch_size']}, seed {cfg['seed']}; head {cfg['head_epochs']} epochs at Adam "
             f"{cfg['lr']:g}; fine-tune {cfg['finetune_epochs']} epochs of the top {cfg['finetune_layers']} "
             f"weighted layers (BatchNorm frozen) at {cfg['lr'] / 10:g}; augmentation {', '.join(AUGMENT)}.")
    L.append("  Baseline: augmentation and frozen backbone inside the model, `image_dataset_from_directory` on "
             "per-split symlink folders built from tlcore's manifest (same files), constant LR. tlcore: "
             "`execute_run` (pixel cache, cached features for the head plus cached features of the mirrored "
             "training images for the flip, tf.data augmentation for the "
             "fine-tune with warm-up + cosine LR and early stopping).")
    L.append(f"- tlcore's one-time dataset import (validate, hash, copy, split; not in the job times): "
             f"{r['import_s']:.1f} s. The converted Lite0 weights are put in every data home before the "
             f"timed runs (neither side pays that one-time conversion).\n")

    L.append("## Side by side\n")
    L.append("Times are wall-clock seconds inside each side's process, from the start of the job. "
             "Ratio = baseline ÷ tlcore (above 1: tlcore is faster / uses less). The machine is shared: the "
             "contention row says how much of the cores other processes took while each side ran; process "
             "CPU time is the figure least affected by it.\n")
    L.append("Two tlcore sides: **tlcore (cold cache)** is a first run in a fresh data home (decodes the "
             "pixels and extracts the backbone features); **tlcore, features cached** is the same job, same "
             "recipe, run again afterwards in its own process in that same data home, so the pixel and "
             "feature caches are warm, as for every later run on the same (dataset, backbone, size, "
             "weights). Its head phase loads the cached features instead of running the backbone; its "
             f"fine-tune still runs the backbone on every image. Feature cache reused by that run: "
             f"{'yes' if warm and summary_of(warm).timings.features_reused else ('no' if warm else 'not measured')}.\n")
    L.append("| | baseline (Keras tutorial) | tlcore (cold cache) | ratio | tlcore, features cached | ratio |")
    L.append("|---|---:|---:|---:|---:|---:|")
    rows = [
        ("decode + pixel cache (s)", None, tt.pixels_s, wt.pixels_s, False),
        ("feature extraction (s) [features cached: load from disk]", None, tt.features_s,
         wt.features_s, False),
        ("head phase wall (s) [tlcore: pixel cache + features + head fit]", bt["head_s"], tl_head_wall, w_head_wall,
         True),
        ("fine-tune phase wall (s)", bt["finetune_s"], tt.finetune_s, wt.finetune_s, True),
        ("evaluation (s)", bt["eval_s"], tt.eval_s, wt.eval_s, True),
        ("whole job (s)", bt["total_s"], tt.total_s, wt.total_s, True),
        ("process wall incl. Python/TF start-up (s)", base["process_wall_s"], tl["process_wall_s"],
         wget("process_wall_s"), True),
        ("process CPU time, user + system (s)", base["cpu_s"], tl["cpu_s"], wget("cpu_s"), True),
    ]
    for name, a, b, w, with_ratio in rows:
        L.append(f"| {name} | {fmt(a)} | {fmt(b)} | {ratio(a, b) if with_ratio else '—'} | {fmt(w)} | "
                 f"{ratio(a, w) if with_ratio else '—'} |")
    share = lambda side: fmt(100 * side["others_cpu_share"], 0, "%") if side else "—"  # noqa: E731
    L.append(f"| cores' time used by OTHER processes meanwhile (contention) | {share(base)} | {share(tl)} | — | "
             f"{share(warm)} | — |")
    L.append(f"| val accuracy after the head phase | {fmt(b_head_val, 4)} | {fmt(t_head_val, 4)} | — | "
             f"{fmt(w_head_val, 4)} | — |")
    L.append(f"| val accuracy at the end | {fmt(final_target, 4)} | {fmt(t_final_val, 4)} | — | "
             f"{fmt(w_final_val, 4)} | — |")
    any_hit = first_reaching(tl["epochs"], head_target) if head_target is not None else None
    for name, b_hit, t_hit, w_hit in (
            (f"time to the baseline's head val accuracy ({fmt(head_target, 4)}) in the head phase (s)",
             b_head_hit, t_head_hit, w_head_hit),
            (f"time to the baseline's head val accuracy ({fmt(head_target, 4)}) in any phase (s)",
             b_head_hit, any_hit, w_any_hit),
            (f"time to the baseline's final val accuracy ({fmt(final_target, 4)}) (s)",
             b_final_hit, t_final_hit, w_final_hit)):
        L.append(f"| {name} | {fmt(t(b_hit))} | {reached(t_hit)} | {ratio(t(b_hit), t(t_hit))} | "
                 f"{reached(w_hit, bool(warm))} | {ratio(t(b_hit), t(w_hit))} |")
    es = summary_of(tl).eval_split
    L.append(f"| {es} accuracy | {fmt(base['accuracy'], 4)} | {fmt(tl['accuracy'], 4)} | — | "
             f"{fmt(wget('accuracy'), 4)} | — |")
    L.append(f"| {es} macro F1 | {fmt(base['macro_f1'], 4)} | {fmt(tl['macro_f1'], 4)} | — | "
             f"{fmt(wget('macro_f1'), 4)} | — |")
    for name, key in (("peak RSS, process tree (MB)", "peak_rss_mb"),
                      ("peak RSS minus file-backed/shared pages (MB)", "peak_anon_mb")):
        L.append(f"| {name} | {fmt(base[key], 0)} | {fmt(tl[key], 0)} | {ratio(base[key], tl[key])} | "
                 f"{fmt(wget(key), 0)} | {ratio(base[key], wget(key))} |")
    L.append("")

    # ---- pipeline efficiency
    fwd, fb = probe["fwd_img_s"], probe["fwdbwd_img_s"]
    # tlcore runs a BatchNorm-folded twin of the backbone; its raw pace is the stricter ceiling.
    fwd_f, fb_f = probe.get("fwd_folded_img_s", fwd), probe.get("fwdbwd_folded_img_s", fb)
    n_all, n_train, n_val = r["images"], r["split_sizes"]["train"], r["split_sizes"]["val"]
    # With flip in the recipe, tlcore also extracts the mirrored training images' features.
    n_extracted = n_all + (n_train if "flip" in AUGMENT else 0)
    extracted_label = "all splits + mirrored train" if "flip" in AUGMENT else "all splits"
    feat_s = tt.features_s
    feat_rate = n_extracted / feat_s if feat_s else None
    L.append("## Pipeline efficiency (fraction of the hardware's pace)\n")
    L.append(f"Raw pace of the same backbone on a batch of {probe['batch_size']} float32 tensors already in "
             f"memory, {cfg['image_size']} px, same process setup, for the stock Keras model and for the "
             f"twin tlcore runs (BatchNorm folded into the convolutions before it, `tlcore.backbones.folding`; "
             f"same outputs): forward (features, `training=False`) **{fwd:.1f} img/s** stock, "
             f"**{fwd_f:.1f} img/s** folded; forward + backward + Adam step with the top "
             f"{cfg['finetune_layers']} layers trainable (`train_on_batch`, tlcore's own compile) "
             f"**{fb:.1f} img/s** stock, **{fb_f:.1f} img/s** folded (the trainable layers stay unfolded). "
             f"Other processes used {probe['others_cpu_share']:.0%} of the cores while this was measured.\n")
    L.append("A fine-tune epoch trains on `train` and validates on `val`, so its hardware-pace time is "
             "train/(fwd+bwd pace) + val/(forward pace). *Stock*: against the stock Keras model's pace (what "
             "the baseline runs). *Own*: against the folded twin's raw pace, the stricter ceiling for tlcore, "
             "so its fraction is the share of the pipeline's own hardware pace it keeps.\n")
    L.append("| stage | images | measured (s) | img/s | at stock pace (s) | fraction, stock | "
             "at own pace (s) | fraction, own |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|")

    def pace_row(label, shown, count, seconds, ideal_stock, ideal_own=None):
        own = (f"{ideal_own:.1f} | {ideal_own / seconds:.0%}" if ideal_own else "— | —")
        L.append(f"| {label} | {shown} | {seconds:.1f} | {count / seconds:.1f} | "
                 f"{ideal_stock:.1f} | {ideal_stock / seconds:.0%} | {own} |")

    if feat_rate:
        pace_row(f"tlcore feature extraction ({extracted_label})", n_extracted, n_extracted, feat_s,
                 n_extracted / fwd, n_extracted / fwd_f)
    ideal_epoch, own_epoch = n_train / fb + n_val / fwd, n_train / fb_f + n_val / fwd_f
    for side, epochs in (("tlcore", tl["epochs"]), ("tlcore, features cached,", warm["epochs"] if warm else []),
                         ("baseline", base["epochs"])):
        for e in epochs:
            if e["phase"] == "finetune":
                pace_row(f"{side} fine-tune epoch {e['epoch']}", f"{n_train}+{n_val}", n_train + n_val, e["seconds"], ideal_epoch,
                         own_epoch if side != "baseline" else None)
    ideal_head = n_train / fwd + n_val / fwd
    for e in base["epochs"]:
        if e["phase"] == "head":
            pace_row(f"baseline head epoch {e['epoch']} (frozen backbone, forward only)", f"{n_train}+{n_val}",
                     n_train + n_val, e["seconds"], ideal_head)
    L.append("")

    # ---- demo latency
    L.append("## Demo latency (single image, EfficientNet-Lite0 classifier)\n")
    if "demo_p50_ms" in probe:
        L.append(f"Through {probe['demo_via']}, in a fresh process; inputs are JPEG bytes of eval images, so each "
                 f"prediction includes decode + resize.\n")
        L.append("| model load (s) | cold first prediction (ms) | p50 (ms) | p95 (ms) | predictions |")
        L.append("|---:|---:|---:|---:|---:|")
        L.append(f"| {probe['demo_load_s']:.2f} | {probe['demo_cold_ms']:.1f} | {probe['demo_p50_ms']:.1f} | "
                 f"{probe['demo_p95_ms']:.1f} | {probe['demo_n']} |")
    else:
        L.append("Not measured (no saved model).")
    L.append("")

    # ---- scale
    L.append("## Scale (tlcore, whole job, fresh data home each)\n")
    L.append("| fraction | images | pixel cache on disk (MB) | contention | pixels (s) | features (s) | head (s) | fine-tune (s) | "
             "whole job (s) | s per 1,000 images | peak RSS (MB) | peak RSS minus file-backed (MB) |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in r["scale"]:
        st = summary_of(s).timings
        L.append(f"| {s['fraction']} | {s['images']} | {s['pixel_cache_mb']:.0f} | {s['others_cpu_share']:.0%} | {fmt(st.pixels_s)} | "
                 f"{fmt(st.features_s)} | {fmt(st.head_s)} | {fmt(st.finetune_s)} | "
                 f"{st.total_s:.1f} | {1000 * st.total_s / s['images']:.1f} | {s['peak_rss_mb']:.0f} | "
                 f"{s['peak_anon_mb']:.0f} |")
    L.append("\nThe pixel cache is a `.npy` opened with `np.load(mmap_mode='r')`; fine-tune batches are "
             "gathered from it by index, so its pages are file-backed and reclaimable (the last column "
             "excludes them).\n")
    capped = r.get("capped")
    if capped:
        L.append("### Under a memory limit smaller than the job plus its data\n")
        L.append(f"The whole job again, cold, in a Linux memory cgroup limited to **{capped['limit_mb']} MB**: the "
                 f"uncapped run's anonymous peak plus a quarter of its {capped['pixel_cache_mb']:.0f} MB pixel cache "
                 f"(rounded up to 50 MB). The limit counts page cache too, so three quarters of the pixels "
                 f"cannot stay in memory: the job must read them from disk again. \"Evicted file data read back\" "
                 f"counts every file page the kernel dropped and read again: the pixel cache, and also "
                 f"TensorFlow's own library files.\n")
        if "skipped" in capped:
            L.append(f"Not measured: {capped['skipped']}.\n")
        else:
            L.append("| limit (MB) | finished | whole job (s) | uncapped (s) | test accuracy | peak usage in the cgroup (MB) "
                     "| evicted file data read back (MB) | major page faults | OOM kills |")
            L.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
            L.append(f"| {capped['limit_mb']} | {'yes' if capped.get('finished') else 'no: ' + capped.get('error', '')} | "
                     f"{fmt(capped.get('total_s'))} | {fmt(capped['uncapped_s'])} | {fmt(capped.get('accuracy'), 4)} | "
                     f"{capped['peak_usage_mb']:.0f} | {capped['reread_mb']:,.0f} | {capped['major_faults']:,} | "
                     f"{capped['oom_kills']} |\n")

    # ---- targets
    def feat_frac_of_pace(seconds):
        return f"{n_extracted / seconds / fwd_f:.0%}" if seconds else "—"

    L.append("## Targets (issue 5)\n")
    L.append("| target | measured | holds |")
    L.append("|---|---|---|")
    def head_target_row(label, hit, head_wall, epochs, note=""):
        speed = (t(b_head_hit) / t(hit)) if (b_head_hit and hit) else None
        if hit:
            measured = f"{speed:.2f}× ({fmt(t(hit))} s vs {fmt(t(b_head_hit))} s to {fmt(head_target, 4)})"
        else:
            best = max((e.get("val_accuracy", -1) for e in epochs if e["phase"] == "head"), default=None)
            measured = (f"never reached {fmt(head_target, 4)} in the head phase (best head val "
                        f"{fmt(best, 4)} in {cfg['head_epochs']} epochs)")
        L.append(f"| head phase ≥ 10× faster to the same val accuracy, {label} | {measured}; head-phase wall "
                 f"{fmt(head_wall)} s vs {fmt(bt['head_s'])} s ({ratio(bt['head_s'], head_wall)}){note} | "
                 f"{'yes' if speed and speed >= 10 else 'no'} |")

    # A cold run cannot start its first head epoch before it has decoded the pixels and run the
    # backbone over every image: however fast the head, its time to the baseline's head accuracy
    # is at least that, which bounds the cold-cache ratio.
    cold_note = ""
    pre_head = (tt.pixels_s or 0) + (tt.features_s or 0)
    if b_head_hit and tt.features_s:
        cold_note = (f". Upper bound even with an instantaneous head: the baseline reached "
                     f"{fmt(head_target, 4)} at {fmt(t(b_head_hit))} s; the cold run spends "
                     f"{fmt(tt.pixels_s)} s decoding + {fmt(tt.features_s)} s extracting features "
                     f"({feat_frac_of_pace(tt.features_s)} of the folded twin's raw forward pace) = {fmt(pre_head)} s "
                     f"before its first head epoch, so at most {t(b_head_hit) / pre_head:.2f}× "
                     f"(extraction alone: {t(b_head_hit) / tt.features_s:.2f}×)")
    head_target_row("cold cache (first run on this dataset)", t_head_hit, tl_head_wall, tl["epochs"], cold_note)
    if warm:
        head_target_row("features cached (every later run)", w_head_hit, w_head_wall, warm["epochs"])
    equal_acc = tl["accuracy"] >= base["accuracy"] - 1e-9
    job_ok = tt.total_s <= bt["total_s"] and equal_acc
    L.append(f"| whole job no slower, at equal or better accuracy | {tt.total_s:.1f} s vs {bt['total_s']:.1f} s "
             f"({ratio(bt['total_s'], tt.total_s)}); accuracy {tl['accuracy']:.4f} vs {base['accuracy']:.4f} | "
             f"{'yes' if job_ok else 'no'} |")
    ft = [e["seconds"] for e in tl["epochs"] if e["phase"] == "finetune"]
    # Judged against the stricter of the two ceilings (the folded twin's own raw pace).
    ft_frac = own_epoch / min(ft) if ft else None
    ft_stock = ideal_epoch / min(ft) if ft else None
    feat_frac = feat_rate / fwd_f if feat_rate else None
    feat_stock = feat_rate / fwd if feat_rate else None
    L.append(f"| feature extraction ≥ 85% of raw forward pace | {fmt(100 * feat_frac if feat_frac else None, 0, '%')} "
             f"of its own (folded) raw pace; {fmt(100 * feat_stock if feat_stock else None, 0, '%')} of the stock "
             f"backbone's | {'yes' if feat_frac and feat_frac >= 0.85 else 'no'} |")
    w_ft = [e["seconds"] for e in (warm["epochs"] if warm else []) if e["phase"] == "finetune"]
    w_ft_note = f" (features-cached run: {own_epoch / min(w_ft):.0%})" if w_ft else ""
    L.append(f"| fine-tune epoch ≥ 85% of raw pace (fastest epoch, cold-cache run) | "
             f"{fmt(100 * ft_frac if ft_frac else None, 0, '%')} of its own (folded) raw pace{w_ft_note}; "
             f"{fmt(100 * ft_stock if ft_stock else None, 0, '%')} of the stock backbone's | "
             f"{'yes' if ft_frac and ft_frac >= 0.85 else 'no'} |")
    p50 = probe.get("demo_p50_ms")
    L.append(f"| demo p50 < 100 ms (lite0, {cfg['image_size']} px) | {fmt(p50, 1, ' ms')} | "
             f"{'yes' if p50 is not None and p50 < 100 else 'no'} |")
    L.append("")

    # ---- per-epoch logs
    L.append("## Per-epoch log\n")
    L.append("| side | phase | epoch | epoch (s) | since job start (s) | loss | accuracy | val loss | val accuracy |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for side, epochs in (("baseline", base["epochs"]), ("tlcore", tl["epochs"]),
                         ("tlcore, features cached", warm["epochs"] if warm else [])):
        for e in epochs:
            L.append(f"| {side} | {e['phase']} | {e['epoch']} | {e['seconds']:.1f} | {e['elapsed_s']:.1f} | "
                     f"{fmt(e.get('loss'), 4)} | {fmt(e.get('accuracy'), 4)} | {fmt(e.get('val_loss'), 4)} | "
                     f"{fmt(e.get('val_accuracy'), 4)} |")
    L.append("")
    return "\n".join(L)


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder of class folders")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--head-epochs", type=int, default=5)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--finetune-layers", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit-per-class", type=int, default=None)
    p.add_argument("--scale", default="0.25,0.5", help="fractions of the data for the scale runs (1 is the main run)")
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--smoke", action="store_true",
                   help="a few images per class at 32 px, 1 epoch per phase, no features-cached side: checks the "
                        "bench runs end to end")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (data homes, logs)")
    p.add_argument("--results", default=None,
                   help="also save the raw measurements as JSON here (re-render with --from-results)")
    p.add_argument("--from-results", default=None,
                   help="write the report from a saved results JSON instead of measuring")
    args = p.parse_args(argv)
    if args.smoke:
        args.image_size, args.head_epochs, args.finetune_epochs = 32, 1, 1
        args.limit_per_class = args.limit_per_class or 8
        args.scale = ""  # the scale section then holds the main run; tests/test_bench_smoke.py checks the rest
    return args


def write_report(out: Path, report: str) -> None:
    """Write `report` to `out`, keeping the sections other benchmarks wrote there after it.

    This benchmark owns the file's head and the `## ` sections it writes; a section with any
    other title (deployment, cluster, audit, ...) is someone else's and stays as it is.
    """
    own = {line for line in report.splitlines() if line.startswith("## ")}
    kept, keeping = [], False
    if out.exists():
        for line in out.read_text().splitlines():
            if line.startswith("## "):
                keeping = line not in own
            if keeping:
                kept.append(line)
    out.write_text(report.rstrip("\n") + ("\n\n" + "\n".join(kept) + "\n" if kept else "\n"))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.from_results:
        results = json.loads(Path(args.from_results).read_text())
        write_report(Path(args.out), build_report(results))
        print(f"[bench] wrote {Path(args.out).resolve()} from {args.from_results}", flush=True)
        return results
    command = "python bench/run.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    data = Path(args.data).resolve()
    workdir = Path(tempfile.mkdtemp(prefix="tlbench-"))
    print(f"[bench] working in {workdir}", flush=True)
    try:
        source = data
        if args.limit_per_class:
            source = subset_copy(data, workdir / "source", per_class=args.limit_per_class)
        home = workdir / "home-main"
        dataset, entries, import_s = import_into(home, source, "bench")
        prepare_weights(home)
        split_sizes = {s: sum(e.split == s for e in entries) for s in ("train", "val", "test")}
        eval_split = "test" if split_sizes["test"] else "val"
        split_dir = split_folders(entries, workdir / "splits")
        cfg = dict(data=str(args.data), image_size=args.image_size, head_epochs=args.head_epochs,
                   finetune_epochs=args.finetune_epochs, finetune_layers=args.finetune_layers,
                   batch_size=args.batch_size, lr=1e-3, dropout=0.2, seed=0)

        def tl_config(dataset_id):
            return dict(dataset=dataset_id, backbone="efficientnet_lite0", image_size=cfg["image_size"],
                        head_epochs=cfg["head_epochs"], finetune_epochs=cfg["finetune_epochs"],
                        finetune_layers=cfg["finetune_layers"], augment=list(AUGMENT),
                        batch_size=cfg["batch_size"], lr=cfg["lr"], dropout=cfg["dropout"], seed=cfg["seed"])

        baseline = measure("baseline", dict(
            split_dir=str(split_dir), labels=list(dataset.classes), size=cfg["image_size"],
            head_epochs=cfg["head_epochs"], finetune_epochs=cfg["finetune_epochs"],
            finetune_layers=cfg["finetune_layers"], batch_size=cfg["batch_size"], lr=cfg["lr"],
            dropout=cfg["dropout"], seed=cfg["seed"], eval_split=eval_split), home, workdir, "baseline")
        tl = measure("tlcore", {"config": tl_config(dataset.id)}, home, workdir, "tlcore")
        # Same job again, own process, same data home: warm pixel and feature caches. The smoke run
        # leaves it out (it is the same measurement as the side above; its test renders its column).
        tl_warm = None
        if not args.smoke:
            tl_warm = measure("tlcore", {"config": tl_config(dataset.id)}, home, workdir, "tlcore-warm")
            if not summary_of(tl_warm).timings.features_reused:
                print("[bench] WARNING: the features-cached run did not reuse the feature cache", flush=True)

        demo_files = [str(e.path) for e in entries if e.split == eval_split][:50]
        probe = measure("probe", dict(run_id=tl["run_id"], demo_files=demo_files, size=cfg["image_size"],
                                      batch_size=cfg["batch_size"], num_classes=len(dataset.classes),
                                      finetune_layers=cfg["finetune_layers"],
                                      min_seconds=0.5 if args.smoke else 15,
                                      demo_repeats=20 if args.smoke else 100), home, workdir, "probe")

        scale = []
        pixel_files = list((home / "cache" / "pixels").rglob("*.npy"))
        for fraction in [float(f) for f in args.scale.split(",") if f.strip()]:
            sub_home = workdir / f"home-{fraction}"
            sub_source = subset_copy(source, workdir / f"source-{fraction}", fraction=fraction)
            sub_ds, sub_entries, _ = import_into(sub_home, sub_source, f"bench-{fraction}")
            prepare_weights(sub_home, template=home)
            res = measure("tlcore", {"config": tl_config(sub_ds.id)}, sub_home, workdir, f"scale-{fraction}")
            res.update(fraction=f"{fraction:g}", images=len(sub_entries),
                       pixel_cache_mb=sum(p.stat().st_size for p in (sub_home / "cache" / "pixels").rglob("*.npy")) / 2**20)
            scale.append(res)
        scale.append({**tl, "fraction": "1", "images": len(entries),
                      "pixel_cache_mb": sum(p.stat().st_size for p in pixel_files) / 2**20})
        capped = measure_capped(tl, scale[-1]["pixel_cache_mb"], source, home, workdir, tl_config,
                                skip="the smoke run skips the capped side (its test checks the cap itself)"
                                if args.smoke else None)

        results = dict(
            date=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), command=command,
            machine=machine(), config=cfg, images=len(entries), classes=list(dataset.classes),
            split_sizes=split_sizes,
            split_counts=", ".join(f"{k} {v}" for k, v in split_sizes.items()), import_s=import_s,
            baseline=baseline, tlcore=tl, tlcore_warm=tl_warm, probe=probe, scale=scale, capped=capped)
        report = build_report(results)
        out = Path(args.out)
        write_report(out, report)
        (workdir / "results.json").write_text(json.dumps(results, indent=1, default=str))
        if args.results:
            Path(args.results).write_text(json.dumps(results, indent=1, default=str))
        print(report, flush=True)
        print(f"[bench] wrote {out.resolve()}", flush=True)
        return results
    finally:
        if args.keep:
            print(f"[bench] kept {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
