"""A large image-classification set made from a real one: crops, rescales, colour jitter and re-encodes.

    python bench/make_large_set.py --count 6000 --out /work/wt/data/large-6000 \
        [--source /work/shared/datasets/flowers] [--big-share 0.01] [--workers 2] [--seed 0]

Each new photo is a source photo (cycled, one folder per class kept) randomly cropped to 60-100 %
of each side, rescaled so its long side is 160-1200 px (a `--big-share` of them 4000x3000,
12 megapixels), colour jittered (brightness, contrast, saturation ±25 %) and saved as JPEG at
quality 60-95. Seeded per photo: the same arguments make the same files. Never commit the output.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import random
import time
from pathlib import Path

from PIL import Image, ImageEnhance

EXTENSIONS = {".jpg", ".jpeg", ".png"}


def sources(root: Path) -> list[tuple[str, Path]]:
    return [(folder.name, path) for folder in sorted(p for p in root.iterdir() if p.is_dir())
            for path in sorted(folder.iterdir()) if path.suffix.lower() in EXTENSIONS]


def make_one(job: tuple[int, str, str, str, float, int]) -> int:
    index, label, source, out, big_share, seed = job
    rng = random.Random(seed * 1_000_003 + index)
    target = Path(out) / label / f"{label}-{index:06d}.jpg"
    if target.exists():
        return target.stat().st_size
    with Image.open(source) as image:
        image = image.convert("RGB")
    w, h = image.size
    cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    image = image.crop((left, top, left + cw, top + ch))
    if rng.random() < big_share:
        size = (4000, 3000) if cw >= ch else (3000, 4000)
    else:
        scale = rng.uniform(160, 1200) / max(cw, ch)
        size = (max(16, round(cw * scale)), max(16, round(ch * scale)))
    image = image.resize(size, Image.BILINEAR)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(rng.uniform(0.75, 1.25))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    image.save(tmp, "JPEG", quality=rng.randint(60, 95))
    tmp.rename(target)
    return target.stat().st_size


def make_large_set(count: int, out: Path, source: Path, big_share: float = 0.01, workers: int = 2,
                   seed: int = 0) -> dict:
    photos = sources(source)
    jobs = [(i, *map(str, photos[i % len(photos)]), str(out), big_share, seed) for i in range(count)]
    started = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        sizes = list(pool.map(make_one, jobs, chunksize=16))
    return {"photos": count, "bytes": sum(sizes), "seconds": round(time.perf_counter() - started, 1),
            "from": f"{len(photos)} photos in {source}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--source", type=Path, default=Path("/work/shared/datasets/flowers"))
    parser.add_argument("--big-share", type=float, default=0.01, help="share of 12-megapixel photos (default 0.01)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_large_set(args.count, args.out, args.source, args.big_share, args.workers, args.seed))


if __name__ == "__main__":
    main()
