"""The 1000 ImageNet class names, offline, and top-k decoding of a classifier's output.

The names ship as `imagenet_classes.json` beside this module (copied once from torchvision's
`_IMAGENET_CATEGORIES`, BSD-3-Clause): short, unique, in the standard ILSVRC-2012 index order.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

_CLASSES_FILE = Path(__file__).with_name("imagenet_classes.json")


@functools.lru_cache(maxsize=1)
def class_names() -> tuple[str, ...]:
    """The 1000 class names; index i is the name of output i."""
    names = json.loads(_CLASSES_FILE.read_text(encoding="utf-8"))["classes"]
    if len(names) != 1000:
        raise ValueError(f"{_CLASSES_FILE.name} must list 1000 classes. Received: {len(names)}")
    return tuple(names)


def class_name(index: int) -> str:
    """The name of ImageNet class `index` (0-999)."""
    return class_names()[index]


def decode_top_k(probs, k: int = 5) -> list[tuple[int, str, float]]:
    """The `k` most probable classes of one 1000-way output as `(index, name, prob)`, best first.

    `probs` may also have a leading batch axis of size 1. Defaults to k=5.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 2 and p.shape[0] == 1:
        p = p[0]
    if p.shape != (1000,):
        raise ValueError(f"`probs` must have shape (1000,) or (1, 1000). Received: shape={p.shape}")
    if not 1 <= k <= 1000:
        raise ValueError(f"`k` must be between 1 and 1000. Received: k={k}")
    names = class_names()
    top = np.argsort(-p, kind="stable")[:k]
    return [(int(i), names[i], float(p[i])) for i in top]
