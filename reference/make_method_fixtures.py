"""Reference for nolad's method layer (Sources/Method): the NoLA stages re-implemented in PyTorch after the
public NoLA code (fazliimam/NoLA: utils/model_utils.top_k_indices_per_class2, utils/utils.find_k and
LabelSmoothingCrossEntropy, trainers/NoLA.py gen_emb / train_taal / setup_optim / forward_backward), on
small random inputs with fixed parameters, fixed data order and fixed initial weights.

Writes Tests/MethodTests/Fixtures/method.json. Run with the reference venv:
    /work/venv/bin/python reference/make_method_fixtures.py
The CLIP/DINO networks are stood in for by given features (stages 1-2) and by a toy prompted encoder
(stage 3-4) that Swift's tests implement identically; the real encoders are the Models layer's business.
"""
import json
import math
import os

import torch
import torch.nn.functional as F

torch.manual_seed(20261129)
torch.set_num_threads(1)
OUT = os.path.join(os.path.dirname(__file__), "..", "Tests", "MethodTests", "Fixtures", "method.json")


def fl(t):
    return t.detach().to(torch.float32).reshape(-1).tolist()


fixture = {}

# ---------------------------------------------------------------- stage 1: CDE classifier (gen_emb)
C, E = 4, 16
sentence_counts = [3, 5, 2, 4]
text = [torch.randn(n, E) for n in sentence_counts]
rows = []
for emb in text:
    e = emb / emb.norm(dim=-1, keepdim=True)
    m = e.mean(dim=0)
    rows.append(m / m.norm())
classifier = torch.stack(rows)  # (C, E)
fixture["stage1"] = {"classes": C, "dim": E, "embeddings": [fl(t) for t in text], "classifier": fl(classifier)}

# ---------------------------------------------------------------- stage 2a: zero-shot + top-k (find_k, top_k_indices_per_class2)
N = 60
logit_scale = 100.0
feats = torch.randn(N, E) * 0.5 + classifier[torch.randint(0, C, (N,))] * 1.5
# class 1 is never anyone's top-1 prediction, so it falls back to its top-2 images (and, coming before
# classes 2 and 3, keeps images they would have selected: duplicates are dropped keeping the first)
feats = feats - 3.0 * classifier[1]
img = feats / feats.norm(dim=-1, keepdim=True)
probs = (logit_scale * img @ classifier.T).softmax(dim=-1)


def find_k(n, c, percentage, min_k):
    return max(min_k, math.floor((n / c) * percentage))


min_k, fraction = 4, 0.2
k = find_k(N, C, fraction, min_k)
top3_conf, top3_pred = torch.topk(probs, k=3, dim=1)
selected = []  # (index, label) in selection order
for cls in range(C):  # set(df.labels) iterates the classes in order
    chosen = []
    for rank in range(3):
        cand = [i for i in range(N) if top3_pred[i, rank].item() == cls]
        if cand:
            cand.sort(key=lambda i: (-top3_conf[i, rank].item(), i))
            chosen = [(i, cls, rank + 1) for i in cand[:k]]
            break
    selected += chosen
seen, sel_idx, sel_lab, ranks = set(), [], [], {}
for i, cls, rank in selected:
    ranks[cls] = rank
    if i not in seen:
        seen.add(i)
        sel_idx.append(i)
        sel_lab.append(cls)
assert ranks[1] >= 2 and len(sel_idx) < C * k, "fixture should exercise a fallback and dropped duplicates"
fixture["stage2_zero_shot"] = {
    "n": N, "logit_scale": logit_scale, "image_features": fl(feats), "probabilities": fl(probs),
    "min_k": min_k, "k_fraction": fraction, "k": k,
    "selected_indices": sel_idx, "selected_labels": sel_lab,
    "rank_used": [ranks.get(c, 0) for c in range(C)],
    "zero_shot_labels": probs.argmax(dim=1).tolist(),
}

# ---------------------------------------------------------------- stage 2b: alignment MLP (AdapterMLP, train_taal)
D, H = 24, 32
dino = torch.randn(N, D)
mlp = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.ReLU(), torch.nn.Linear(H, C))
initial = {k_: fl(v) for k_, v in mlp.state_dict().items()}
x_sel, y_sel = dino[sel_idx], torch.tensor(sel_lab)
epochs, batch = 50, 5
opt = torch.optim.Adam(mlp.parameters())  # lr 1e-3, betas (0.9, 0.999), eps 1e-8: the reference's defaults
orders, losses = [], []
for epoch in range(epochs):
    perm = torch.randperm(len(sel_idx))
    orders.append(perm.tolist())
    total = 0.0
    for s in range(0, len(perm), batch):
        b = perm[s:s + batch]
        opt.zero_grad()
        loss = F.cross_entropy(mlp(x_sel[b]), y_sel[b])
        loss.backward()
        opt.step()
        total += loss.item() * len(b)
    losses.append(total / len(perm))
with torch.no_grad():
    teacher_probs = mlp(dino).softmax(dim=-1)
teacher = teacher_probs.argmax(dim=1)
fixture["stage2_alignment"] = {
    "dim": D, "hidden": H, "epochs": epochs, "batch": batch, "lr": 1e-3, "dino_features": fl(dino),
    "initial": initial, "orders": orders, "epoch_losses": losses,
    "trained": {k_: fl(v) for k_, v in mlp.state_dict().items()},
    "probabilities": fl(teacher_probs), "teacher_labels": teacher.tolist(),
}

# ---------------------------------------------------------------- pieces of stage 3 on their own
logits = torch.randn(6, 5) * 3
targets = torch.tensor([0, 4, 2, 2, 1, 3])
lg = logits.clone().requires_grad_(True)
eps = 0.1
n_ = lg.size(-1)
logp = F.log_softmax(lg, dim=-1)
ls_loss = eps * (-logp.sum(dim=-1)).mean() / n_ + (1 - eps) * F.nll_loss(logp, targets)  # LabelSmoothingCrossEntropy
ls_loss.backward()
assert torch.allclose(ls_loss, F.cross_entropy(logits, targets, label_smoothing=eps))
p = torch.randn(7, requires_grad=True)
p0 = fl(p)
adamw = torch.optim.AdamW([p], lr=0.004, betas=(0.9, 0.999), weight_decay=0.01)
grads = []
for s in range(3):
    g = torch.randn(7)
    grads.append(fl(g))
    p.grad = g
    adamw.step()
fixture["stage3_pieces"] = {
    "logits": fl(logits), "targets": targets.tolist(), "smoothing": eps, "loss": ls_loss.item(), "grad": fl(lg.grad),
    "adamw": {"initial": p0, "grads": grads, "lr": 0.004, "weight_decay": 0.01, "final": fl(p),
              "exp_avg": fl(adamw.state[p]["exp_avg"]), "exp_avg_sq": fl(adamw.state[p]["exp_avg_sq"])},
}

# ---------------------------------------------------------------- stage 3 loop and stage 4 on a toy prompted encoder
# Toy encoder (Swift's ToyEncoder in the tests): an image is S tokens of width W; tokens = [prompts; image];
# pooled = mean over tokens; y = post_layernorm.weight * pooled + post_layernorm.bias; features = y @ proj (W, E).
W, S, P = 8, 3, 2
pixels = torch.randn(N, S, W)
proj = torch.randn(W, E) * 0.5
val = math.sqrt(6.0 / float(3 * 16 * 16 + W))  # the reference's prompt init bound with patch (16, 16)
prompts = torch.empty(P, W).uniform_(-val, val).requires_grad_(True)
gamma = (1 + 0.1 * torch.randn(W)).requires_grad_(True)
beta = (0.1 * torch.randn(W)).requires_grad_(True)
head = classifier.clone().requires_grad_(True)  # cde_adapter weight = avg_text_emb.T: (C, E)
init3 = {"prompts": fl(prompts), "post_layernorm.weight": fl(gamma), "post_layernorm.bias": fl(beta)}


def toy_features(x):  # x (B, S, W)
    tokens = torch.cat([prompts.expand(x.shape[0], -1, -1), x], dim=1)
    return (gamma * tokens.mean(dim=1) + beta) @ proj


def strong_view(i, epoch):  # what the strong-view sampler gives for image i in an epoch (toy)
    return pixels[i] * (1 + 0.1 * epoch) + 0.05 * (epoch + 1)


# setup_optim: names containing 'bias' are not decayed; prompts, LayerNorm weights and the head are
opt3 = torch.optim.AdamW([{"params": [prompts, gamma, head], "weight_decay": 0.01},
                          {"params": [beta], "weight_decay": 0.0}], lr=0.01, betas=(0.9, 0.999))
logical, micro, epochs3 = 16, 5, 2
orders3, metrics = [], []
for epoch in range(epochs3):
    perm = torch.randperm(N)
    orders3.append(perm.tolist())
    batches = [perm[s:s + logical] for s in range(0, N, logical)]
    if N >= logical and len(batches[-1]) < logical:  # dassl's train loader drops the last partial batch
        batches = batches[:-1]
    loss_sum, agree, seen_ = 0.0, 0, 0
    for b in batches:
        opt3.zero_grad()
        for s in range(0, len(b), micro):
            mb = b[s:s + micro]
            x = torch.stack([strong_view(i.item(), epoch) for i in mb])
            out = toy_features(x) @ head.T
            loss = F.cross_entropy(out, teacher[mb], label_smoothing=0.1, reduction="sum")
            (loss / len(b)).backward()
            loss_sum += loss.item()
            agree += (out.argmax(dim=1) == teacher[mb]).sum().item()
            seen_ += len(mb)
        opt3.step()
    metrics.append({"loss": loss_sum / seen_, "agreement": agree / seen_})
with torch.no_grad():
    final_logits = toy_features(pixels) @ head.T
    final_probs = final_logits.softmax(dim=-1)
conf, labels = final_probs.max(dim=1)
state = opt3.state
fixture["stage3_loop"] = {
    "width": W, "tokens": S, "prompt_count": P, "pixels": fl(pixels), "proj": fl(proj), "initial": init3,
    "lr": 0.01, "weight_decay": 0.01, "smoothing": 0.1, "logical_batch": logical, "micro_batch": micro,
    "epochs": epochs3, "orders": orders3, "epoch_metrics": metrics,
    "final": {"prompts": fl(prompts), "post_layernorm.weight": fl(gamma), "post_layernorm.bias": fl(beta),
              "head": fl(head)},
    "final_exp_avg_sq_prompts": fl(state[prompts]["exp_avg_sq"]),
    "steps": int(state[prompts]["step"]),
    "labels": labels.tolist(), "confidences": fl(conf),
}

with open(OUT, "w") as f:
    json.dump(fixture, f)
print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes); k={k}, selected {len(sel_idx)}, ranks {ranks}, "
      f"alignment loss {losses[0]:.4f} -> {losses[-1]:.4f}, prompt-tuning {metrics}")
