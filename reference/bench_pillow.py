"""Pillow + torchvision decode + weak-view throughput, the reference for `nolad bench-images`.

    "$NOLAD_REFERENCE_PYTHON" reference/bench_pillow.py --generate DIR      # ~200 photo-like JPEGs
    "$NOLAD_REFERENCE_PYTHON" reference/bench_pillow.py --folder DIR --processes N

Each image: Image.open(path).convert("RGB") → Resize(224, BICUBIC) → CenterCrop(224) → ToTensor →
Normalize(CLIP mean/std) (or, with --strong, NoLA's strong view), in N worker processes (torch.set_num_threads(1) in each), as a DataLoader
with N workers would do it.
"""
import argparse
import multiprocessing as mp
import os
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def generate(folder, count_small=190, count_large=10):
    from make_image_fixtures import photo_like

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(123)
    for k in range(count_small + count_large):
        w, h = (4000, 3000) if k < count_large else (1024, 768)
        if k % 3 == 1:
            w, h = h, w  # some portrait
        im = photo_like(w // 4, h // 4, 1000 + k).resize((w, h), Image.BICUBIC)
        arr = np.asarray(im).astype(np.int16) + rng.normal(0, 4, (h, w, 3)).astype(np.int16)
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
        im.save(os.path.join(folder, f"photo_{k:03d}.jpg"), "JPEG", quality=90, subsampling=2)
    print(f"wrote {count_small + count_large} JPEGs to {folder}")


_transform = None


class _PillowGaussianBlur:
    """NoLA/MoCo-style blur: Pillow's GaussianBlur with radius uniform in [0.1, 2]."""

    def __call__(self, im):
        import random

        from PIL import ImageFilter

        return im.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


def _init(strong=False, jitter=True):
    global _transform
    import torch
    import torchvision.transforms as T

    torch.set_num_threads(1)
    normalize = T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    if strong:
        _transform = T.Compose([
            T.RandomResizedCrop(224, scale=(0.2, 1.0)),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8 if jitter else 0.0),
            T.RandomPerspective(0.2, p=0.5, interpolation=T.InterpolationMode.BICUBIC),
            T.ColorJitter(0.4, 0.4, 0.4, 0.1) if jitter else T.Lambda(lambda im: im),
            _PillowGaussianBlur(),
            T.ToTensor(),
            normalize,
        ])
    else:
        _transform = T.Compose([
            T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
            normalize,
        ])


def _work(path):
    start = time.process_time()  # CPU time of this worker: robust to other load on the machine
    with Image.open(path) as im:
        _transform(im.convert("RGB"))
    return time.process_time() - start


def _checksum(data):
    """Σ b[i]·((i·0x9E3779B1 mod 2^32) | 1) mod 2^64, as nolad bench-images --checksums computes it."""
    b = np.frombuffer(data, dtype=np.uint8).astype(np.uint64)
    i = np.arange(b.size, dtype=np.uint64)
    w = ((i * np.uint64(0x9E3779B1)) & np.uint64(0xFFFFFFFF)) | np.uint64(1)
    with np.errstate(over="ignore"):
        return f"{int((b * w).sum(dtype=np.uint64)):016x}"


def checksums(folder):
    """Per file: checksums of Pillow's decoded RGB and of torchvision's uint8 weak view (nolad bench-images --checksums)."""
    import torchvision.transforms as T

    view = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)])
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with Image.open(path) as im:
                rgb = im.convert("RGB")
        except Exception:
            print(f"{name} error")
            continue
        print(f"{name} {rgb.width}x{rgb.height} {_checksum(rgb.tobytes())} {_checksum(view(rgb).tobytes())}")


def bench(folder, processes, repeats, strong, jitter=True):
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f)))
    print(f"bench_pillow: {len(files)} files in {folder}, {processes} process(es), {'strong' if strong else 'weak'} view{'' if jitter or not strong else ' without colour jitter'}")
    with mp.get_context("fork").Pool(processes, initializer=_init, initargs=(strong, jitter)) as pool:
        pool.map(_work, files[: processes], chunksize=1)  # start the workers
        for r in range(repeats):
            start = time.perf_counter()
            cpu = sum(pool.map(_work, files, chunksize=1))
            s = time.perf_counter() - start
            print(f"pass {r + 1}: {len(files)} images in {s:.2f} s = {len(files) / s:.1f} images/s, "
                  f"{cpu * 1000 / len(files):.2f} CPU-ms per image")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--generate")
    ap.add_argument("--folder")
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--checksums", action="store_true", help="print per-file hashes instead of timing")
    ap.add_argument("--strong", action="store_true", help="NoLA's strong view instead of the weak view")
    ap.add_argument("--no-colour-jitter", action="store_true",
                    help="with --strong: no ColorJitter (the job parameter colour_jitter: false, as the demo runs)")
    a = ap.parse_args()
    if a.generate:
        generate(a.generate)
    if a.folder and a.checksums:
        checksums(a.folder)
    elif a.folder:
        bench(a.folder, a.processes, a.repeats, a.strong, not a.no_colour_jitter)
