"""Train the tiny DINO of the demo world (transformers ViTModel layout, no pooler).

    python world/train_dino.py CACHE.npy OUT_DIR BUDGET_SECONDS [SEED]

Self-distillation as in DINO (Caron et al. 2021): a student and an EMA teacher share
the architecture plus a projection head (MLP -> L2 norm -> weight-normalised prototypes);
the teacher sees the 2 global crops, the student all crops (2 global + LOCAL local);
teacher outputs are centred and sharpened (low temperature); the loss is the
cross-entropy between teacher and student distributions over different views.

Centring (CENTERING): "sk" (default) is DINOv2's Sinkhorn-Knopp centring of the teacher's
sharpened outputs over the batch (3 iterations): every prototype gets an equal share of the
batch, so neither the uniform nor the one-prototype collapse of the EMA centre can happen at
small batch sizes; "ema" is DINO v1's running centre (momentum CENTER_M). KOLEO > 0 adds
DINOv2's KoLeo regulariser on the student's CLS features of the global crops.

The saved model takes 224 px input at patch 32 (7x7 patches). To spend the CPU budget on the
network rather than on pixels, training runs on the same 7x7 grid at half resolution: images
are 2x2-averaged to 112 px once, global crops are 112 px at patch 16, local crops 48 px (3x3
patches, position embeddings interpolated). A patch-16 embedding of the 2x2-averaged image is
exactly a patch-32 embedding of the full image whose kernel repeats each weight over a 2x2 block
at a quarter of its value, so the saved model is that patch-32 model: the same function, applied
to the pipeline's 224 px weak view. Crops are cut for the whole batch at once by an affine grid
(bilinear). The head is discarded at save time. Schedules (lr, teacher momentum) follow wall time, as in train_clip.py.
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
PATCH = int(os.environ.get("PATCH", "32"))  # patch size of the saved model, at 224 px
GLOBAL, LOCAL_SIZE, TRAIN_PATCH = 112, 48, PATCH // 2  # training runs at half resolution, see the header
WIDTH = int(os.environ.get("WIDTH", "128"))
DEPTH = int(os.environ.get("DEPTH", "4"))
LOCAL = int(os.environ.get("LOCAL", "4"))
OUT_DIM = int(os.environ.get("OUT_DIM", "128"))
CENTERING = os.environ.get("CENTERING", "sk")
KOLEO = float(os.environ.get("KOLEO", "0.1"))
TT = float(os.environ.get("TT", "0.03"))  # teacher temperature (sharpening)
TS = float(os.environ.get("TS", "0.1"))  # student temperature
CENTER_M = float(os.environ.get("CENTER_M", "0.9"))  # centre EMA momentum (CENTERING=ema)
G_SCALE = tuple(float(v) for v in os.environ.get("G_SCALE", "0.3,1.0").split(","))
L_SCALE = tuple(float(v) for v in os.environ.get("L_SCALE", "0.05,0.3").split(","))
BLUR_P = float(os.environ.get("BLUR_P", "0.4"))  # probability of blurring a view
BLUR_SIGMA = tuple(float(v) for v in os.environ.get("BLUR_SIGMA", "0.5,2.0").split(","))  # px at crop size
GRAY_P = float(os.environ.get("GRAY_P", "0.2"))
JITTER = float(os.environ.get("JITTER", "0.4"))  # brightness/contrast/saturation factors uniform in 1 +- JITTER
COLOUR_PERM = os.environ.get("COLOUR_PERM", "1") == "1"  # random channel permutation of every view
ROT = float(os.environ.get("ROT", "180"))  # crops are rotated by an angle uniform in +-ROT degrees
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


def make_config(image_size, patch=PATCH):
    from transformers import ViTConfig
    return ViTConfig(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=WIDTH // 32,
                     intermediate_size=4 * WIDTH, image_size=image_size, patch_size=patch, qkv_bias=True, layer_norm_eps=1e-6,
                     hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def crops(batch, g):
    """batch: uint8 B x H x W x 3 numpy -> list of 2 global + LOCAL local float tensors (normalised).
    Random resized crops (area scale in G_SCALE / L_SCALE of the image, aspect 3/4..4/3, flip p=0.5,
    rotation within +-ROT degrees; the world's shapes come at any angle) cut for the whole batch by one
    affine grid per view, bilinear, border pixels repeated where a rotated crop leaves the image."""
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0
    B = x.shape[0]
    r = lambda *s: torch.rand(*s, generator=g)
    views = []
    for v in range(2 + LOCAL):
        size, (lo, hi) = (GLOBAL, G_SCALE) if v < 2 else (LOCAL_SIZE, L_SCALE)
        area = lo + (hi - lo) * r(B)
        ar = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * r(B))
        w = torch.sqrt(area * ar).clamp(max=1.0)  # crop width and height as fractions of the image
        h = torch.sqrt(area / ar).clamp(max=1.0)
        cx = (1 - w) * (2 * r(B) - 1)  # crop centre in [-1, 1] grid coordinates, crop inside the image
        cy = (1 - h) * (2 * r(B) - 1)
        flip = torch.where(r(B) < 0.5, -1.0, 1.0)
        a = math.radians(ROT) * (2 * r(B) - 1)
        cos, sin = torch.cos(a), torch.sin(a)
        theta = torch.zeros(B, 2, 3)  # output grid -> input: scale by the crop size, rotate, flip, shift
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = w * flip * cos, -w * sin, cx
        theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = h * flip * sin, h * cos, cy
        grid = F.affine_grid(theta, (B, 3, size, size), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        views.append(colour_augment(out, g, solarize=(v == 1)))
    return [(v - MEAN) / STD for v in views]


def colour_augment(x, g, solarize):
    """Colour augmentation: random channel permutation (COLOUR_PERM=1 only: it makes the features
    colour-blind, which the shape worlds v1-v2 wanted and the colour-theme world must not have),
    brightness/contrast/saturation jitter (p=0.8, strength JITTER), grayscale (GRAY_P), blur (BLUR_P),
    solarisation (p=0.2, second global view only)."""
    B = x.shape[0]
    r = lambda *s: torch.rand(*s, generator=g)
    if COLOUR_PERM:
        perm = torch.stack([torch.randperm(3, generator=g) for _ in range(B)])
        x = torch.gather(x, 1, perm.view(B, 3, 1, 1).expand_as(x))
    on = (r(B) < 0.8).float().view(B, 1, 1, 1)
    bright = 1 + (r(B) * 2 - 1).mul(JITTER).view(B, 1, 1, 1) * on
    x = (x * bright).clamp(0, 1)
    mean = x.mean((1, 2, 3), keepdim=True)
    contrast = 1 + (r(B) * 2 - 1).mul(JITTER).view(B, 1, 1, 1) * on
    x = ((x - mean) * contrast + mean).clamp(0, 1)
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    sat = 1 + (r(B) * 2 - 1).mul(JITTER).view(B, 1, 1, 1) * on
    x = ((x - gray) * sat + gray).clamp(0, 1)
    gmask = (r(B) < GRAY_P).float().view(B, 1, 1, 1)
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)
    x = x * (1 - gmask) + gray * gmask
    # Gaussian blur with a per-view sigma: a strong blur removes stripes, dots and pixel noise
    # (nuisance textures shared by all crops of an image) and keeps the object's silhouette.
    # Computed for the chosen images only.
    chosen = (r(B) < BLUR_P).nonzero().flatten()
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * r(1).item()
    if len(chosen):
        rad = max(1, int(math.ceil(2.5 * sigma)))
        k = torch.exp(-0.5 * (torch.arange(-rad, rad + 1, dtype=torch.float32) / sigma) ** 2)
        k = k / k.sum()
        sub = x[chosen]
        n, c, h, w = sub.shape
        rows = F.conv1d(F.pad(sub.reshape(n * c * h, 1, w), (rad, rad), mode="replicate"), k.view(1, 1, -1))
        cols = rows.reshape(n, c, h, w).transpose(2, 3).reshape(n * c * w, 1, h)
        cols = F.conv1d(F.pad(cols, (rad, rad), mode="replicate"), k.view(1, 1, -1))
        x = x.clone()
        x[chosen] = cols.reshape(n, c, w, h).transpose(2, 3)
    if solarize:
        smask = (r(B) < 0.2).float().view(B, 1, 1, 1)
        x = x * (1 - smask) + torch.where(x > 0.5, 1 - x, x) * smask
    return x


def halve(images, chunk=1000):
    """uint8 N x 224 x 224 x 3 -> N x 112 x 112 x 3, each output pixel the mean of a 2x2 block."""
    out = np.empty((images.shape[0], images.shape[1] // 2, images.shape[2] // 2, 3), np.uint8)
    for i in range(0, len(images), chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + chunk])).permute(0, 3, 1, 2).float()
        out[i:i + chunk] = F.avg_pool2d(x, 2).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return out


def to_full_resolution(state):
    """The half-resolution patch-16 state dict -> the patch-32 state dict at 224 px (see the header)."""
    sd = dict(state)
    w = sd["embeddings.patch_embeddings.projection.weight"]  # (D, 3, 16, 16)
    sd["embeddings.patch_embeddings.projection.weight"] = w.repeat_interleave(2, 2).repeat_interleave(2, 3) / 4
    return sd


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
    f = torch.cat([model(pixel_values=x[i:i + 96]).last_hidden_state[:, 0]
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


def teacher_targets(teacher_out, center, tt=TT):
    """teacher_out: list of 2 (global views) of B x K -> list of 2 target distributions B x K."""
    if CENTERING == "ema":
        return [F.softmax((o - center) / tt, dim=-1) for o in teacher_out]
    # Sinkhorn-Knopp over both global views together: rows (images) sum to 1, columns (prototypes)
    # to 2B/K, starting from the sharpened scores
    logits = torch.cat(teacher_out) / tt
    q = torch.exp(logits - logits.max()).t()  # K x 2B
    q /= q.sum()
    k, n = q.shape
    for _ in range(3):
        q /= q.sum(1, keepdim=True)
        q /= k
        q /= q.sum(0, keepdim=True)
        q /= n
    return list((q * n).t().chunk(2))


def dino_loss(student_out, targets, ts=TS):
    """student_out: list over views of B x K; targets: list of 2 (global views) of B x K."""
    s = [F.log_softmax(o / ts, dim=-1) for o in student_out]
    total, n = 0.0, 0
    for iq, q in enumerate(targets):
        for v, lp in enumerate(s):
            if v == iq:
                continue
            total = total + (-(q * lp).sum(-1)).mean()
            n += 1
    return total / n


def koleo_loss(x, eps=1e-8):
    """Kozachenko-Leonenko entropy estimate (DINOv2): minus the mean log distance of each
    L2-normalised feature to its nearest neighbour in the batch."""
    x = F.normalize(x, dim=-1)
    dots = x @ x.t()
    dots.fill_diagonal_(-2.0)
    nn_idx = dots.argmax(1)
    d = (x - x[nn_idx]).norm(dim=-1)
    return -torch.log(d + eps).mean()


def main():
    cache, out_dir, budget = sys.argv[1], sys.argv[2], float(sys.argv[3])
    seed = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    torch.manual_seed(seed)
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    from transformers import ViTImageProcessor, ViTModel

    images = np.load(cache, mmap_mode="r")
    n = images.shape[0]
    print(f"{n} images; model width {WIDTH}, depth {DEPTH}, {OUT_DIM} prototypes, centring {CENTERING}, "
          f"TT {TT}, TS {TS}, KoLeo {KOLEO}, {LOCAL} local crops", flush=True)
    images = halve(images)
    student = ViTModel(make_config(GLOBAL, TRAIN_PATCH), add_pooling_layer=False)
    teacher = ViTModel(make_config(GLOBAL, TRAIN_PATCH), add_pooling_layer=False)
    s_head, t_head = Head(WIDTH), Head(WIDTH)
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
    ev = None
    if EVAL_EVERY > 0:
        x224, y = load_eval(EVAL_DIR, 224)
        ev = (F.avg_pool2d(x224, 2), y)  # the same 2x2 average as the training images (normalisation is linear)
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
            t_feats = teacher(pixel_values=torch.cat(views[:2])).last_hidden_state[:, 0]
            t_out = t_head(t_feats).chunk(2)
        s_global = student(pixel_values=torch.cat(views[:2])).last_hidden_state[:, 0]
        s_local = student(pixel_values=torch.cat(views[2:]), interpolate_pos_encoding=True).last_hidden_state[:, 0]
        s_out = list(s_head(s_global).chunk(2)) + list(s_head(s_local).chunk(LOCAL))
        if center is None:
            center = torch.cat(t_out).mean(0, keepdim=True)
        with torch.no_grad():
            targets = teacher_targets(t_out, center)
        loss = dino_loss(s_out, targets)
        if KOLEO > 0:
            loss = loss + KOLEO * sum(koleo_loss(c) for c in s_global.chunk(2)) / 2
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
                q = torch.cat(targets)
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

    # save the teacher (as DINO releases)
    final = ViTModel(make_config(224), add_pooling_layer=False)
    final.load_state_dict(to_full_resolution(teacher.state_dict()))
    if ev is not None:
        cq, kq = feature_quality(final, *load_eval(EVAL_DIR, 224))
        print(f"saved model at 224 px / patch {PATCH}: centroid {cq:.3f} kNN10 {kq:.3f}", flush=True)
    final = final.half()
    final.save_pretrained(out_dir)
    torch.save({"student": student.state_dict(), "teacher": teacher.state_dict(), "t_head": t_head.state_dict(),
                "s_head": s_head.state_dict(), "center": center}, os.environ.get("FULL_OUT", "/tmp/world/dino_full.pt"))
    ViTImageProcessor(size={"height": 224, "width": 224}, resample=3, image_mean=MEAN.flatten().tolist(),
                      image_std=STD.flatten().tolist()).save_pretrained(out_dir)


if __name__ == "__main__":
    main()
