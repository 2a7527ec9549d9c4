"""The NoLA stages in PyTorch on the demo world (reference figures for nolad's pipeline).

    python world/nola_reference.py [--epochs 2,5,10] [--seed 0] [--min-k 16] [--k-fraction 0.2] [--no-colour-jitter] [--out world/reference_results.json]

Follows docs in shared DESIGN.md:
 1. class vectors: templates + Demo/descriptions.json sentences, CLIP text encoder, L2-normalised,
    mean per class, re-normalised; zero-shot = argmax of logit_scale * cosine on the weak view.
 2. pseudo-labels: per class the k = max(min_k, floor(k_fraction N / C)) most confident top-1 images
    (top-2, then top-3 for a class with none), duplicates dropped; MLP D -> 256 -> ReLU -> C on the
    DINO CLS features of the weak view (CLIP normalisation), Adam 1e-3, CE, batch 32, 50 epochs.
 3. prompt tuning: 16 prompts inserted after CLS after CLIP's pre-LayerNorm; trained: prompts, every
    vision LayerNorm, a linear head (projection_dim -> C, no bias) initialised from the class vectors
    and applied to the (unnormalised) projected image embedding, as the public NoLA/LaFTer code does.
    Teacher: argmax of the MLP on DINO weak-view features (computed once). Student: head on a strong
    view. Label-smoothing CE 0.1, AdamW lr 0.004 wd 0.01 (none on biases), batch 512 by accumulation.
 4. labels: argmax of the head on the weak view with prompts.
Accuracies are against the folder names of Demo/collection.
"""

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2 as T
import sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))
from common import PillowGaussianBlur, clip_image_embeds  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
# nolad's built-in templates (Sources/Method/Descriptions.swift, PromptTemplates.all), so both build the same classifier
TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}.", "a close-up photo of a {}.", "a cropped photo of the {}.",
             "a bright photo of a {}.", "a photo of the large {}.", "a photo of the small {}.", "itap of a {}.",
             "art of the {}."]
N_PROMPTS = 16


def weak_view(img):
    """Resize shorter side to 224 (bicubic), centre-crop 224, CLIP mean/std."""
    w, h = img.size
    s = 224 / min(w, h)
    nw, nh = max(224, round(w * s)), max(224, round(h * s))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = int(round((nw - 224) / 2.0)), int(round((nh - 224) / 2.0))
    img = img.crop((left, top, left + 224, top + 224))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def strong_view(colour_jitter=True):
    """NoLA's strong view as the public code builds it (utils/model_utils.py, get_random_transform): a
    ColorJitter inside RandomApply(p=0.8), the perspective, a second ColorJitter always applied, then
    Pillow's GaussianBlur with a radius uniform in [0.1, 2]. colour_jitter=False drops both ColorJitters
    (nolad's job parameter colour_jitter)."""
    jitter = [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)] if colour_jitter else []
    second = [T.ColorJitter(0.4, 0.4, 0.4, 0.1)] if colour_jitter else []
    return T.Compose([
        T.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        *jitter,
        T.RandomPerspective(0.2, p=0.5),
        *second,
        PillowGaussianBlur(0.1, 2.0),
        T.ToImage(), T.ToDtype(torch.float32, scale=True),
        T.Normalize(MEAN, STD),
    ])


def load_collection(root):
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    paths, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(root, c))):
            paths.append(os.path.join(root, c, f))
            labels.append(i)
    return classes, paths, torch.tensor(labels)


@torch.no_grad()
def class_vectors(clip, tok, classes, descriptions):
    vecs = []
    for c in classes:
        sentences = descriptions.get(c, []) + [t.format(c.replace("_", " ")) for t in TEMPLATES]
        ids = tok(sentences, padding=True, return_tensors="pt")
        e = clip.get_text_features(**ids)
        e = e.pooler_output if hasattr(e, "pooler_output") else e
        e = F.normalize(e, dim=-1).mean(0)
        vecs.append(F.normalize(e, dim=0))
    return torch.stack(vecs)  # C x P


def pseudo_labels(probs, k):
    """Per class the k most confident images predicted as that class (top-1; a class with no top-1
    image falls back to its top-2, then top-3 predictions); an image is kept once."""
    N, C = probs.shape
    order = probs.argsort(dim=1, descending=True)
    taken, sel_idx, sel_lab = set(), [], []
    for c in range(C):
        for rank in (1, 2, 3):
            cand = (order[:, :rank] == c).any(1).nonzero().flatten()
            if len(cand):
                break
        cand = cand[probs[cand, c].argsort(descending=True)][:k]
        for i in cand.tolist():
            if i not in taken:
                taken.add(i)
                sel_idx.append(i)
                sel_lab.append(c)
    return torch.tensor(sel_idx), torch.tensor(sel_lab)


def train_alignment(feats, idx, pl, C, seed):
    """The alignment module: MLP D -> 256 -> ReLU -> C on feats[idx] with pseudo-labels pl, Adam 1e-3,
    cross-entropy, batch 32, 50 epochs."""
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(feats.shape[1], 256), nn.ReLU(), nn.Linear(256, C))
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for ep in range(50):
        perm = torch.randperm(len(idx), generator=g)
        for b in range(0, len(idx), 32):
            j = perm[b:b + 32]
            loss = F.cross_entropy(mlp(feats[idx[j]]), pl[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return mlp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", default="2,5,10")
    ap.add_argument("--min-k", type=int, default=16)  # nolad job parameters min_k and k_fraction
    ap.add_argument("--k-fraction", type=float, default=0.2)
    ap.add_argument("--no-colour-jitter", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clip", default=os.path.join(ROOT, "Demo/models/tiny-clip"))
    ap.add_argument("--dino", default=os.path.join(ROOT, "Demo/models/tiny-dino"))
    ap.add_argument("--collection", default=os.path.join(ROOT, "Demo/collection"))
    ap.add_argument("--descriptions", default=os.path.join(ROOT, "Demo/descriptions.json"))
    ap.add_argument("--out", default=os.path.join(ROOT, "world/reference_results.json"))
    ap.add_argument("--micro", type=int, default=64)
    args = ap.parse_args()
    strong = strong_view(colour_jitter=not args.no_colour_jitter)
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    from transformers import CLIPModel, CLIPTokenizer, ViTModel

    t_all = time.time()
    timings, results = {}, {"seed": args.seed}
    clip = CLIPModel.from_pretrained(args.clip, dtype=torch.float32).eval()
    tok = CLIPTokenizer.from_pretrained(args.clip)
    dino = ViTModel.from_pretrained(args.dino, dtype=torch.float32, add_pooling_layer=False).eval()
    classes, paths, labels = load_collection(args.collection)
    descriptions = json.load(open(args.descriptions))
    N, C = len(paths), len(classes)
    images = [Image.open(p).convert("RGB") for p in paths]
    weak = torch.stack([weak_view(im) for im in images])
    results.update(classes=classes, images=N)
    results.update(min_k=args.min_k, k_fraction=args.k_fraction, colour_jitter=not args.no_colour_jitter)

    # 1. zero-shot
    t = time.time()
    with torch.no_grad():
        W = class_vectors(clip, tok, classes, descriptions)
        feats = torch.cat([clip_image_embeds(clip, weak[i:i + 128]) for i in range(0, N, 128)])
        logits = clip.logit_scale.exp() * F.normalize(feats, dim=-1) @ W.t()
        probs = logits.softmax(-1)
    zs = probs.argmax(1)
    results["zero_shot_acc"] = (zs == labels).float().mean().item()
    print(f"zero-shot acc {results['zero_shot_acc']:.4f} ({time.time() - t:.0f}s)", flush=True)
    timings["zero_shot_s"] = time.time() - t

    # 2. pseudo-labels and the alignment module
    t = time.time()
    k = max(args.min_k, math.floor(args.k_fraction * N / C))
    idx, pl = pseudo_labels(probs, k)
    results["k"] = k
    results["pseudo_labels"] = len(idx)
    results["pseudo_label_acc"] = (pl == labels[idx]).float().mean().item()
    with torch.no_grad():
        dfeat = torch.cat([dino(pixel_values=weak[i:i + 64]).last_hidden_state[:, 0] for i in range(0, N, 64)])
    mlp = train_alignment(dfeat, idx, pl, C, args.seed)
    with torch.no_grad():
        teacher = mlp(dfeat).argmax(1)
    results["alignment_acc"] = (teacher == labels).float().mean().item()
    # DINO feature quality, for diagnosis only: nearest-centroid accuracy with true labels
    with torch.no_grad():
        fn = F.normalize(dfeat, dim=-1)
        cent = F.normalize(torch.stack([fn[labels == c].mean(0) for c in range(C)]), dim=-1)
        results["diag_dino_true_centroid_acc"] = ((fn @ cent.t()).argmax(1) == labels).float().mean().item()
        cn = F.normalize(feats, dim=-1)
        cent = F.normalize(torch.stack([cn[labels == c].mean(0) for c in range(C)]), dim=-1)
        results["diag_clip_true_centroid_acc"] = ((cn @ cent.t()).argmax(1) == labels).float().mean().item()
        small = F.interpolate(weak, size=(112, 112), mode="bilinear", antialias=True, align_corners=False)
        f112 = F.normalize(dino(pixel_values=small, interpolate_pos_encoding=True).last_hidden_state[:, 0], dim=-1)
        cent = F.normalize(torch.stack([f112[labels == c].mean(0) for c in range(C)]), dim=-1)
        results["diag_dino112_true_centroid_acc"] = ((f112 @ cent.t()).argmax(1) == labels).float().mean().item()
    timings["alignment_s"] = time.time() - t
    print(f"pseudo-labels {len(idx)} acc {results['pseudo_label_acc']:.4f}; alignment acc "
          f"{results['alignment_acc']:.4f} ({time.time() - t:.0f}s); diag: DINO true-centroid acc "
          f"{results['diag_dino_true_centroid_acc']:.4f} (at 112 px {results['diag_dino112_true_centroid_acc']:.4f}), CLIP {results['diag_clip_true_centroid_acc']:.4f}", flush=True)

    # 3. prompt tuning, 4. labels
    results["final"] = {}
    state0 = {k2: v.clone() for k2, v in clip.state_dict().items()}
    for E in [int(e) for e in args.epochs.split(",")]:
        t = time.time()
        clip.load_state_dict(state0)
        torch.manual_seed(args.seed)
        width = clip.config.vision_config.hidden_size
        val = math.sqrt(6.0 / (3 * 16 * 16 + width))
        prompts = nn.Parameter(torch.empty(1, N_PROMPTS, width).uniform_(-val, val))
        head = nn.Parameter(W.clone())  # C x P
        for p in clip.parameters():
            p.requires_grad_(False)
        lns = [m for m in clip.vision_model.modules() if isinstance(m, nn.LayerNorm)]
        ln_w = [m.weight for m in lns]
        ln_b = [m.bias for m in lns]
        for p in ln_w + ln_b:
            p.requires_grad_(True)
        opt = torch.optim.AdamW([{"params": [prompts, head] + ln_w, "weight_decay": 0.01},
                                 {"params": ln_b, "weight_decay": 0.0}], lr=0.004)
        crit = nn.CrossEntropyLoss(label_smoothing=0.1)
        g = torch.Generator().manual_seed(args.seed)
        torch.manual_seed(args.seed)  # the torchvision augmentations draw from the global generator
        clip.train()
        steps, losses = 0, []
        for ep in range(E):
            perm = torch.randperm(N, generator=g)
            for b0 in range(0, N, 512):
                batch = perm[b0:b0 + 512]
                opt.zero_grad()
                tot = 0.0
                for m0 in range(0, len(batch), args.micro):
                    j = batch[m0:m0 + args.micro]
                    x = torch.stack([strong(images[i]) for i in j.tolist()])
                    out = clip_image_embeds(clip, x, prompts) @ head.t()
                    loss = crit(out, teacher[j]) * len(j) / len(batch)
                    loss.backward()
                    tot += loss.item()
                opt.step()
                steps += 1
                losses.append(tot)
        clip.eval()
        with torch.no_grad():
            out = torch.cat([clip_image_embeds(clip, weak[i:i + 128], prompts) @ head.t() for i in range(0, N, 128)])
        final = out.argmax(1)
        conf = out.softmax(-1).max(1).values
        results["final"][str(E)] = {"acc": (final == labels).float().mean().item(), "steps": steps,
                                    "last_loss": losses[-1], "mean_confidence": conf.mean().item(),
                                    "seconds": time.time() - t}
        print(f"E={E}: final acc {results['final'][str(E)]['acc']:.4f} ({steps} steps, loss {losses[-1]:.4f}, "
              f"{time.time() - t:.0f}s)", flush=True)
    results["timings"] = timings
    results["total_s"] = time.time() - t_all
    print(json.dumps(results, indent=1))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
