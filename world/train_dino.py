"""Train the tiny DINO of the demo world (transformers ViTModel layout, no pooler).

    python world/train_dino.py CACHE.npy OUT_DIR BUDGET_SECONDS [SEED]

Self-distillation as in DINO (Caron et al. 2021): a student and an EMA teacher share
the architecture plus a projection head (MLP -> L2 norm -> weight-normalised prototypes);
the teacher sees the 2 global crops, the student all crops (2 global + LOCAL local);
teacher outputs are centred (EMA centre) and sharpened (low temperature); the loss is the
cross-entropy between teacher and student distributions over different views.

To fit a CPU budget the network trains at low resolution: global crops 112 px (7x7 patches),
local crops 48 px (3x3 patches), with the position embeddings interpolated bicubically.
At save time the 7x7 position grid is interpolated to 14x14 so the saved model takes
224 px images (config image_size 224). The head is discarded at save time.
Schedules (lr, teacher momentum) follow wall time, as in train_clip.py.
"""

import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # CLIP's, as NoLA feeds DINO
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
GLOBAL, LOCAL_SIZE = 112, 48
LOCAL = int(os.environ.get("LOCAL", "2"))
OUT_DIM = int(os.environ.get("OUT_DIM", "512"))
TT = float(os.environ.get("TT", "0.04"))  # teacher temperature (sharpening)
TS = float(os.environ.get("TS", "0.1"))  # student temperature
CENTER_M = float(os.environ.get("CENTER_M", "0.9"))  # centre EMA momentum
G_SCALE = tuple(float(v) for v in os.environ.get("G_SCALE", "0.35,1.0").split(","))
L_SCALE = tuple(float(v) for v in os.environ.get("L_SCALE", "0.05,0.35").split(","))
BLUR_P = float(os.environ.get("BLUR_P", "0.3"))  # probability of blurring a view
BLUR_SIGMA = tuple(float(v) for v in os.environ.get("BLUR_SIGMA", "1.0,1.0").split(","))  # px at crop size
GRAY_P = float(os.environ.get("GRAY_P", "0.2"))
EVAL_EVERY = float(os.environ.get("EVAL_EVERY", "0"))  # seconds; 0 = no periodic evaluation
EVAL_DIR = os.environ.get("EVAL_DIR", "Demo/collection")


class Head(nn.Module):
    def __init__(self, d, hidden=512, bottleneck=64, out=OUT_DIM):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.proto = nn.Parameter(torch.randn(out, bottleneck) * 0.02)

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.proto, dim=-1))


def make_config(image_size):
    from transformers import ViTConfig
    return ViTConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                     image_size=image_size, patch_size=16, qkv_bias=True, layer_norm_eps=1e-6,
                     hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def crops(batch, g):
    """batch: uint8 B x H x W x 3 numpy -> list of 2 global + LOCAL local float tensors (normalised)."""
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0
    B, _, H, W = x.shape
    views = []
    for v in range(2 + LOCAL):
        size, (lo, hi) = (GLOBAL, G_SCALE) if v < 2 else (LOCAL_SIZE, L_SCALE)
        out = torch.empty(B, 3, size, size)
        for b in range(B):
            area = H * W * (lo + (hi - lo) * torch.rand(1, generator=g).item())
            ar = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(1, generator=g).item())
            w = int(min(W, round(math.sqrt(area * ar))))
            h = int(min(H, round(math.sqrt(area / ar))))
            i = int(torch.randint(0, H - h + 1, (1,), generator=g))
            j = int(torch.randint(0, W - w + 1, (1,), generator=g))
            c = x[b:b + 1, :, i:i + h, j:j + w]
            if torch.rand(1, generator=g).item() < 0.5:
                c = c.flip(-1)
            out[b] = F.interpolate(c, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        views.append(colour_augment(out, g, solarize=(v == 1)))
    return [(v - MEAN) / STD for v in views]


def colour_augment(x, g, solarize):
    """Strong colour augmentation so the features cannot rest on colour: random channel
    permutation, brightness/contrast/saturation jitter (p=0.8), grayscale (p=0.2),
    blur (p=0.3), solarisation (p=0.2, second global view only)."""
    B = x.shape[0]
    r = lambda *s: torch.rand(*s, generator=g)
    perm = torch.stack([torch.randperm(3, generator=g) for _ in range(B)])
    x = torch.gather(x, 1, perm.view(B, 3, 1, 1).expand_as(x))
    on = (r(B) < 0.8).float().view(B, 1, 1, 1)
    bright = 1 + (r(B) * 0.8 - 0.4).view(B, 1, 1, 1) * on
    x = (x * bright).clamp(0, 1)
    mean = x.mean((1, 2, 3), keepdim=True)
    contrast = 1 + (r(B) * 0.8 - 0.4).view(B, 1, 1, 1) * on
    x = ((x - mean) * contrast + mean).clamp(0, 1)
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    sat = 1 + (r(B) * 0.8 - 0.4).view(B, 1, 1, 1) * on
    x = ((x - gray) * sat + gray).clamp(0, 1)
    gmask = (r(B) < GRAY_P).float().view(B, 1, 1, 1)
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)
    x = x * (1 - gmask) + gray * gmask
    # Gaussian blur with a per-view sigma: a strong blur removes stripes, dots and pixel noise
    # (nuisance textures shared by all crops of an image) and keeps the object's silhouette
    bmask = (r(B) < BLUR_P).float().view(B, 1, 1, 1)
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * r(1).item()
    rad = max(1, int(math.ceil(2.5 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-rad, rad + 1, dtype=torch.float32) / sigma) ** 2)
    k = k / k.sum()
    xp = F.pad(x, (rad, rad, rad, rad), mode="replicate")
    blurred = F.conv2d(xp, k.view(1, 1, 1, -1).expand(3, 1, 1, -1).contiguous(), groups=3)
    blurred = F.conv2d(blurred, k.view(1, 1, -1, 1).expand(3, 1, -1, 1).contiguous(), groups=3)
    x = x * (1 - bmask) + blurred * bmask
    if solarize:
        smask = (r(B) < 0.2).float().view(B, 1, 1, 1)
        x = x * (1 - smask) + torch.where(x > 0.5, 1 - x, x) * smask
    return x


def load_eval(root, size):
    """Evaluation only (never used for training): the labelled demo collection, resized to size px."""
    from PIL import Image
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    xs, ys = [], []
    for c, name in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(root, name))):
            img = Image.open(os.path.join(root, name, f)).convert("RGB").resize((size, size), Image.BICUBIC)
            xs.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0)
            ys.append(c)
    return (torch.stack(xs)[:, :] - MEAN) / STD, torch.tensor(ys)


@torch.no_grad()
def feature_quality(model, x, y, k=10):
    """Diagnostics with true labels (evaluation only): nearest-class-centroid accuracy and
    leave-one-out k-NN accuracy (cosine) of the CLS features."""
    f = torch.cat([model(pixel_values=x[i:i + 96], interpolate_pos_encoding=True).last_hidden_state[:, 0]
                   for i in range(0, len(x), 96)])
    f = F.normalize(f - f.mean(0, keepdim=True), dim=-1)
    C = int(y.max()) + 1
    cent = F.normalize(torch.stack([f[y == c].mean(0) for c in range(C)]), dim=-1)
    centroid = ((f @ cent.t()).argmax(1) == y).float().mean().item()
    sim = f @ f.t()
    sim.fill_diagonal_(-2)
    nn_idx = sim.topk(k, dim=1).indices
    votes = F.one_hot(y[nn_idx], C).sum(1)
    knn = (votes.argmax(1) == y).float().mean().item()
    return centroid, knn


def dino_loss(student_out, teacher_out, center, ts=TS, tt=TT):
    """student_out: list over views of B x K; teacher_out: list of 2 (global views) of B x K."""
    t = [F.softmax((o - center) / tt, dim=-1) for o in teacher_out]
    s = [F.log_softmax(o / ts, dim=-1) for o in student_out]
    total, n = 0.0, 0
    for iq, q in enumerate(t):
        for v, lp in enumerate(s):
            if v == iq:
                continue
            total = total + (-(q * lp).sum(-1)).mean()
            n += 1
    return total / n


def main():
    cache, out_dir, budget = sys.argv[1], sys.argv[2], float(sys.argv[3])
    seed = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    torch.manual_seed(seed)
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    from transformers import ViTImageProcessor, ViTModel

    images = np.load(cache, mmap_mode="r")
    n = images.shape[0]
    student = ViTModel(make_config(GLOBAL), add_pooling_layer=False)
    teacher = ViTModel(make_config(GLOBAL), add_pooling_layer=False)
    s_head, t_head = Head(128), Head(128)
    teacher.load_state_dict(student.state_dict())
    t_head.load_state_dict(s_head.state_dict())
    resume = os.environ.get("RESUME")
    center = torch.zeros(1, OUT_DIM)
    if resume:  # continue a run from its full checkpoint (student, teacher, heads, centre)
        ck = torch.load(resume)
        student.load_state_dict(ck["student"])
        teacher.load_state_dict(ck["teacher"])
        t_head.load_state_dict(ck["t_head"])
        s_head.load_state_dict(ck.get("s_head", ck["t_head"]))
        center = ck.get("center", None)
        print(f"resumed from {resume}", flush=True)
    for p in list(teacher.parameters()) + list(t_head.parameters()):
        p.requires_grad_(False)
    params = list(student.named_parameters()) + [("head." + k, v) for k, v in s_head.named_parameters()]
    decay = [p for k, p in params if p.ndim >= 2 and "embeddings" not in k]
    no_decay = [p for k, p in params if not (p.ndim >= 2 and "embeddings" not in k)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.04}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=5e-4)
    base_lr, bs, warm = float(os.environ.get("LR", "5e-4")), int(os.environ.get("BATCH", "32")), 0.04
    mom0 = float(os.environ.get("MOM0", "0.99"))
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    step, epoch, pos = 0, 0, 0
    perm = torch.randperm(n, generator=g)
    losses = []
    ev = load_eval(EVAL_DIR, GLOBAL) if EVAL_EVERY > 0 else None
    next_eval = 0.0
    while True:
        if ev is not None and time.time() - t0 >= next_eval:
            cq, kq = feature_quality(teacher, *ev)
            print(f"eval step {step} t {time.time() - t0:.0f}s teacher CLS @{GLOBAL}px: centroid {cq:.3f} "
                  f"kNN10 {kq:.3f}", flush=True)
            next_eval += EVAL_EVERY
        frac = (time.time() - t0) / budget
        if frac >= 1:
            break
        lr = base_lr * (frac / warm if frac < warm else 0.5 * (1 + math.cos(math.pi * (frac - warm) / (1 - warm))))
        lr = max(lr, 1e-6)
        for grp in opt.param_groups:
            grp["lr"] = lr
        mom = 1 - (1 - mom0) * 0.5 * (1 + math.cos(math.pi * frac))
        if pos + bs > n:
            perm = torch.randperm(n, generator=g)
            pos, epoch = 0, epoch + 1
        idx = perm[pos:pos + bs].sort().values.tolist()
        pos += bs
        views = crops(np.stack([images[i] for i in idx]), g)
        with torch.no_grad():
            t_feats = teacher(pixel_values=torch.cat(views[:2]), interpolate_pos_encoding=True).last_hidden_state[:, 0]
            t_out = t_head(t_feats).chunk(2)
        s_global = student(pixel_values=torch.cat(views[:2]), interpolate_pos_encoding=True).last_hidden_state[:, 0]
        s_local = student(pixel_values=torch.cat(views[2:]), interpolate_pos_encoding=True).last_hidden_state[:, 0]
        s_out = list(s_head(s_global).chunk(2)) + list(s_head(s_local).chunk(LOCAL))
        if center is None:
            center = torch.cat(t_out).mean(0, keepdim=True)
        loss = dino_loss(s_out, t_out, center)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if frac < 0.05:  # freeze the prototypes at the start, as DINO does for its last layer
            s_head.proto.grad = None
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 3.0)
        opt.step()
        with torch.no_grad():
            for ps, pt in zip(list(student.parameters()) + list(s_head.parameters()),
                              list(teacher.parameters()) + list(t_head.parameters())):
                pt.mul_(mom).add_(ps.detach(), alpha=1 - mom)
            center = CENTER_M * center + (1 - CENTER_M) * torch.cat(t_out).mean(0, keepdim=True)
        losses.append(loss.item())
        step += 1
        if step % 25 == 0:
            with torch.no_grad():  # per-image teacher entropy, and entropy of the batch-mean teacher distribution
                q = F.softmax((torch.cat(t_out) - center) / TT, -1)
                ent = -(q * q.clamp_min(1e-12).log()).sum(-1).mean()
                qm = q.mean(0)
                ment = -(qm * qm.clamp_min(1e-12).log()).sum()
            print(f"step {step} epoch {epoch} t {time.time() - t0:.0f}s lr {lr:.2e} mom {mom:.4f} "
                  f"loss {np.mean(losses[-25:]):.4f} teacher-entropy {ent:.3f} marginal {ment:.3f}", flush=True)
    if ev is not None:
        cq, kq = feature_quality(teacher, *ev)
        print(f"eval final step {step} teacher CLS @{GLOBAL}px: centroid {cq:.3f} kNN10 {kq:.3f}", flush=True)
    print(f"done: {step} steps, {step * bs} images, {time.time() - t0:.0f}s, final loss (last 50) "
          f"{np.mean(losses[-50:]):.4f}", flush=True)

    # save the teacher (as DINO releases) at 224 px: interpolate the 7x7 position grid to 14x14
    final = ViTModel(make_config(224), add_pooling_layer=False)
    sd = teacher.state_dict()
    pe = sd["embeddings.position_embeddings"]
    cls_pe, grid = pe[:, :1], pe[:, 1:]
    side = int(math.sqrt(grid.shape[1]))
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(14, 14), mode="bicubic", align_corners=False)
    sd["embeddings.position_embeddings"] = torch.cat([cls_pe, grid.permute(0, 2, 3, 1).reshape(1, 196, -1)], 1)
    final.load_state_dict(sd)
    final = final.half()
    final.save_pretrained(out_dir)
    torch.save({"student": student.state_dict(), "teacher": teacher.state_dict(), "t_head": t_head.state_dict(),
                "s_head": s_head.state_dict(), "center": center}, os.environ.get("FULL_OUT", "/tmp/world/dino_full.pt"))
    ViTImageProcessor(size={"height": 224, "width": 224}, resample=3, image_mean=MEAN.flatten().tolist(),
                      image_std=STD.flatten().tolist()).save_pretrained(out_dir)


if __name__ == "__main__":
    main()
