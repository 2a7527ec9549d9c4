"""The whole-job benchmark of `nolad bench-job` in PyTorch (the reference pipeline's stages, as in
world/nola_reference.py): random full-size CLIP ViT-B/32 and DINO ViT-B/16 (transformers), N synthetic
images, C classes, E prompt-tuning epochs.

    "$NOLAD_REFERENCE_PYTHON" reference/bench_job_torch.py --images 64 --classes 10 --epochs 1 --batch 32 --micro-batch 32 --threads 2

--teacher per-step (the default) is the public NoLA code's schedule: DINO features are computed for the
pseudo-labelled subset only before the alignment module is trained (NoLA.select_top_k), and each prompt-
tuning step recomputes the teacher, DINO + alignment MLP on the weak views of its batch
(NoLA.forward_backward). --teacher cached applies nolad's savings to PyTorch instead: DINO features of
every weak view once, teacher labels once per image.
"""
import argparse
import math
import resource
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2 as T
from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel
import os
import sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PillowGaussianBlur, clip_image_embeds  # noqa: E402

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
WEAK = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToImage(),
                  T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])
STRONG = T.Compose([
    T.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
    T.RandomHorizontalFlip(),
    T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
    T.RandomPerspective(0.2, p=0.5),
    # As the public NoLA code (and nolad): the second ColorJitter always applies, then Pillow's blur.
    T.ColorJitter(0.4, 0.4, 0.4, 0.1),
    PillowGaussianBlur(0.1, 2.0),
    T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD),
])


def synthetic_image(i):
    """Same pixels as nolad bench-job: 320x240, (7x + 13y + 29c + 31i) mod 256."""
    y, x, c = np.mgrid[0:240, 0:320, 0:3]
    return Image.fromarray(((7 * x + 13 * y + 29 * c + 31 * i) % 256).astype(np.uint8))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sentences", type=int, default=9)
    ap.add_argument("--teacher", choices=["per-step", "cached"], default="per-step")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig()).eval()
    dino = ViTModel(ViTConfig(patch_size=16), add_pooling_layer=False).eval()
    images = [synthetic_image(i) for i in range(a.images)]
    N, C = a.images, a.classes
    print(f"PyTorch {torch.__version__} bench-job: N {N}, C {C}, E {a.epochs}, batch {a.batch} (micro {a.micro_batch}), "
          f"threads {a.threads}, teacher {a.teacher}, random full-size CLIP ViT-B/32 + DINO ViT-B/16")
    timings = []
    t_all = time.time()

    t = time.time()
    with torch.no_grad():
        vecs = []
        for _ in range(C):
            ids = torch.cat([torch.full((a.sentences, 1), 49406), torch.randint(1, 49406, (a.sentences, 18)),
                             torch.full((a.sentences, 1), 49407)], dim=1)
            e = clip.get_text_features(input_ids=ids)
            e = e.pooler_output if hasattr(e, "pooler_output") else e
            vecs.append(F.normalize(F.normalize(e, dim=-1).mean(0), dim=0))
        W = torch.stack(vecs)
    timings.append(("1 text encoder + classifier", time.time() - t))

    def dino_features(indices):
        with torch.no_grad():
            return torch.cat([dino(pixel_values=torch.stack([WEAK(images[i]) for i in indices[b:b + 16]]))
                              .last_hidden_state[:, 0] for b in range(0, len(indices), 16)])

    t = time.time()
    with torch.no_grad():
        feats, dfeat = [], []
        for b in range(0, N, 16):
            x = torch.stack([WEAK(im) for im in images[b:b + 16]])
            feats.append(clip_image_embeds(clip, x))
            if a.teacher == "cached":
                dfeat.append(dino(pixel_values=x).last_hidden_state[:, 0])
        feats = torch.cat(feats)
    timings.append(("2a weak views + CLIP (+ DINO, cached) features", time.time() - t))

    t = time.time()
    probs = (clip.logit_scale.exp() * F.normalize(feats, dim=-1) @ W.t()).softmax(-1)
    k = max(16, math.floor(0.2 * N / C))
    order = probs.argsort(dim=1, descending=True)
    taken, idx, pl = set(), [], []
    for c in range(C):
        for rank in (1, 2, 3):
            cand = (order[:, rank - 1] == c).nonzero().flatten()
            if len(cand):
                break
        for i in cand[probs[cand, c].argsort(descending=True)][:k].tolist():
            if i not in taken:
                taken.add(i); idx.append(i); pl.append(c)
    idx, pl = torch.tensor(idx, dtype=torch.long), torch.tensor(pl, dtype=torch.long)
    if a.teacher == "cached":
        dfeat = torch.cat(dfeat)
        selected = dfeat[idx]
    else:
        selected = dino_features(idx.tolist())
    mlp = nn.Sequential(nn.Linear(selected.shape[1], 256), nn.ReLU(), nn.Linear(256, C))
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-3)
    for _ in range(50):
        perm = torch.randperm(len(idx))
        for b in range(0, len(idx), 32):
            j = perm[b:b + 32]
            loss = F.cross_entropy(mlp(selected[j]), pl[j])
            opt.zero_grad(); loss.backward(); opt.step()
    if a.teacher == "cached":
        with torch.no_grad():
            teacher = mlp(dfeat).argmax(1)
    timings.append(("2b zero-shot, pseudo-labels, (DINO of selected,) MLP", time.time() - t))

    t = time.time()
    width = clip.config.vision_config.hidden_size
    val = math.sqrt(6.0 / (3 * 16 * 16 + width))
    prompts = nn.Parameter(torch.empty(1, 16, width).uniform_(-val, val))
    head = nn.Linear(W.shape[1], C, bias=False)
    head.weight.data.copy_(W)
    for p in clip.parameters():
        p.requires_grad_(False)
    norms = [m for m in clip.vision_model.modules() if isinstance(m, nn.LayerNorm)]
    named = [("prompts", prompts), ("head.weight", head.weight)]
    for i, m in enumerate(norms):
        m.weight.requires_grad_(True); m.bias.requires_grad_(True)
        named += [(f"ln{i}.weight", m.weight), (f"ln{i}.bias", m.bias)]
    groups = [{"params": [p for n, p in named if "bias" not in n], "weight_decay": 0.01},
              {"params": [p for n, p in named if "bias" in n], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=0.004)
    steps = 0
    for _ in range(a.epochs):
        perm = torch.randperm(N)
        batches = [perm[b:b + a.batch] for b in range(0, N, a.batch)]
        if N >= a.batch and len(batches[-1]) < a.batch:
            batches.pop()
        for bidx in batches:
            opt.zero_grad()
            for m in range(0, len(bidx), a.micro_batch):
                j = bidx[m:m + a.micro_batch]
                if a.teacher == "cached":
                    target = teacher[j]
                else:
                    with torch.no_grad():
                        target = mlp(dino_features(j.tolist())).argmax(1)
                x = torch.stack([STRONG(images[i]) for i in j.tolist()])
                logits = head(clip_image_embeds(clip, x, prompts))
                loss = F.cross_entropy(logits, target, label_smoothing=0.1) * len(j) / len(bidx)
                loss.backward()
            opt.step()
            steps += 1
    timings.append(("3 prompt tuning (strong views + fwd/bwd, teacher)", time.time() - t))

    t = time.time()
    with torch.no_grad():
        out = []
        for b in range(0, N, 16):
            x = torch.stack([WEAK(im) for im in images[b:b + 16]])
            out.append(head(clip_image_embeds(clip, x, prompts)).argmax(1))
        labels = torch.cat(out)
    timings.append(("4 labels (prompted CLIP on weak views)", time.time() - t))
    total = time.time() - t_all
    for name, s in timings:
        print(f"{name:<56}{s:8.1f} s")
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(f"total {total:.1f} s ({len(labels)} labels, {steps} prompt-tuning steps); CPU time {ru.ru_utime + ru.ru_stime:.1f} s; "
          f"peak memory {ru.ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
