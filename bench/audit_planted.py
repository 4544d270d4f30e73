"""The data audit on planted errors: how many it finds, how many it invents, how long it takes.

    python bench/audit_planted.py --data ../shared/datasets/flowers [--flip 0.05] [--copies 20]
        [--limit-per-class N] [--out bench/results/audit.json]

In a fresh `$TLCORE_HOME`, the folder is imported as is (the clean copy, stratified split,
seed 0) and written back out with that split given (train/ val/ test/), so a planted copy keeps
every image in its split. The planted copy then gets:
- label flips: a fraction of all images moved to another (random) class folder;
- cross-split near-duplicates: of `--copies` test images, three copies each put into train
  (same class): re-encoded as JPEG quality 60, resized to 0.8x, and cropped by 6 % per side.
Each audit runs as `python -m tlcore audit ... --json` in its own process: the clean copy cold
(no cached features), the clean copy again (warm), the planted copy (only the new copies are
extracted), the planted copy again (warm). Reported: recall of the flips among the top
N = 2 x planted label issues, recall of the planted duplicate pairs among the top N = 2 x planted
near-duplicates, what the audit flags on the clean copy, and the times.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
TRANSFORMS = ("jpeg60", "resize0.8", "crop6")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--flip", type=float, default=0.05)
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--limit-per-class", type=int)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "audit.json")
    parser.add_argument("--keep", type=Path, help="work in this new folder and keep it (data home included)")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="audit-bench-"))
    work.mkdir(parents=True, exist_ok=False)
    env = {**os.environ, "TLCORE_HOME": str(work / "home")}
    try:
        clean_src = work / "flowers"
        copy_classes(args.data, clean_src, args.limit_per_class)
        os.environ["TLCORE_HOME"] = env["TLCORE_HOME"]
        from tlcore.data.importer import import_dataset
        from tlcore.data.manifest import load_manifest

        first = import_dataset(clean_src, "flowers-split")
        entries = load_manifest(first.dataset.id)
        clean, planted = work / "clean", work / "planted"
        for e in entries:
            for root in (clean, planted):
                dest = root / e.split / e.label / Path(e.source).name
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(e.path, dest)
        flips, duplicates = plant(planted, entries, args.flip, args.copies, random.Random(0))
        import_dataset(clean, "flowers-clean")
        import_dataset(planted, "flowers-planted")

        runs = {}
        for key, name in (("clean_cold", "flowers-clean"), ("clean_warm", "flowers-clean"),
                          ("planted_new_copies", "flowers-planted"), ("planted_warm", "flowers-planted")):
            runs[key] = run_audit(name, env)
            print(f"[bench] {key}: {runs[key]['wall_s']:.1f} s wall, audit {runs[key]['timings']['total_s']:.1f} s",
                  flush=True)

        result = score(runs, flips, duplicates, len(entries))
        result["load"] = os.getloadavg()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def copy_classes(src: Path, dest: Path, limit: int | None) -> None:
    for class_dir in sorted(p for p in src.iterdir() if p.is_dir()):
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
        (dest / class_dir.name).mkdir(parents=True)
        for f in files:
            shutil.copy(f, dest / class_dir.name / f.name)


def plant(root: Path, entries, flip_fraction: float, copies: int, rng: random.Random):
    """Flip labels and add near-duplicate copies of test images to train; returns what was planted."""
    classes = sorted({e.label for e in entries})
    tests = rng.sample([e for e in entries if e.split == "test"], copies)
    copied = {e.source for e in tests}
    candidates = [e for e in entries if e.source not in copied]
    flips = {}
    for e in rng.sample(candidates, round(flip_fraction * len(entries))):
        new_label = rng.choice([c for c in classes if c != e.label])
        name = Path(e.source).name
        (root / e.split / e.label / name).rename(root / e.split / new_label / name)
        flips[f"{e.split}/{new_label}/{name}"] = e.label  # the source path the planted import gives it
    duplicates = []
    for e in tests:
        original = Image.open(e.path).convert("RGB")
        stem = Path(e.source).stem
        for transform in TRANSFORMS:
            name = f"{stem}-{transform}.jpg"
            transformed(original, transform).save(root / "train" / e.label / name, quality=60 if transform ==
                                                   "jpeg60" else 90)
            duplicates.append({"test": f"test/{e.label}/{Path(e.source).name}", "copy": f"train/{e.label}/{name}",
                               "transform": transform})
    return flips, duplicates


def transformed(image: Image.Image, transform: str) -> Image.Image:
    w, h = image.size
    if transform == "resize0.8":
        return image.resize((round(w * 0.8), round(h * 0.8)), Image.BILINEAR)
    if transform == "crop6":
        dx, dy = round(w * 0.06), round(h * 0.06)
        return image.crop((dx, dy, w - dx, h - dy))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=60)
    return Image.open(io.BytesIO(buffer.getvalue()))


def run_audit(dataset: str, env: dict) -> dict:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "tlcore", "audit", dataset, "--json"], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    report["wall_s"] = round(time.perf_counter() - started, 2)
    return report


def score(runs: dict, flips: dict, duplicates: list, images: int) -> dict:
    planted = runs["planted_warm"]
    n_flips = 2 * len(flips)
    top_issues = [i["source"] for i in planted["label_issues"][:n_flips]]
    found_flips = sum(s in flips for s in top_issues)
    suggested_right = sum(flips.get(i["source"]) == i["suggested"] for i in planted["label_issues"][:n_flips])
    cross = [d for d in planted["near_duplicates"] if d["splits"][0] != d["splits"][1]]
    top_pairs = {frozenset((d["a"], d["b"])) for d in cross[:2 * len(duplicates)]}
    found = [d for d in duplicates if frozenset((d["test"], d["copy"])) in top_pairs]
    clean = runs["clean_warm"]
    return {
        "images_clean": images,
        "images_planted": planted["images"],
        "flips_planted": len(flips),
        "label_issues_flagged": len(planted["label_issues"]),
        "flip_recall_top_2n": round(found_flips / len(flips), 4),
        "flips_suggested_right_in_top_2n": suggested_right,
        "duplicate_pairs_planted": len(duplicates),
        "duplicate_recall_top_2n": round(len(found) / len(duplicates), 4),
        "duplicate_recall_by_transform": {t: sum(d["transform"] == t for d in found) for t in TRANSFORMS},
        "duplicate_similarities_planted": sorted(
            d["similarity"] for d in cross if any(frozenset((d["a"], d["b"])) == frozenset((p["test"], p["copy"]))
                                                for p in duplicates))[:5],
        "clean_label_issues": len(clean["label_issues"]),
        "clean_near_duplicates": len(clean["near_duplicates"]),
        "clean_cross_split_duplicates": sum(d["splits"][0] != d["splits"][1] for d in clean["near_duplicates"]),
        "clean_outliers": len(clean["outliers"]),
        "planted_outliers": len(planted["outliers"]),
        "times": {k: {"wall_s": r["wall_s"], **r["timings"]} for k, r in runs.items()},
        "clean_top_near_duplicates": clean["near_duplicates"][:10],
        "runs": {k: {"label_issues": r["label_issues"][:50], "near_duplicates": r["near_duplicates"][:150],
                     "outliers": r["outliers"][:30]} for k, r in runs.items()},
    }


if __name__ == "__main__":
    sys.exit(main())
