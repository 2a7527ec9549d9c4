"""Reference for nolad's method layer (Sources/Method): the NoLA stages re-implemented in PyTorch after the
public NoLA code (fazliimam/NoLA: utils/model_utils.top_k_indices_per_class2, utils/utils.find_k and
LabelSmoothingCrossEntropy, trainers/NoLA.py gen_emb / train_taal / setup_optim / forward_backward), on
small random inputs with fixed parameters, fixed data order and fixed initial weights.

Writes Tests/MethodTests/Fixtures/method.json. Run with the reference venv:
    "$NOLAD_REFERENCE_PYTHON" reference/make_method_fixtures.py
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


# ---------------------------------------------------------------- the four stages on tiny random CLIP and DINO models
# Hugging Face layout folders under Fixtures/tiny-clip and Fixtures/tiny-dino (safetensors F32). Weak views
# are random pixel tensors (decoding and resizing are the Imaging layer's business); strong views are a
# fixed, deterministic transform of them (below), standing in for the seeded augmentation sampler.
from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

FIXTURES = os.path.dirname(OUT)


def randomize(model):
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if name == "logit_scale":
                continue
            if prm.ndim >= 2 and "embedding" not in name and "token" not in name:
                prm.normal_(0, 1 / math.sqrt(prm[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                prm.normal_(1, 0.2)
            else:
                prm.normal_(0, 0.5)


clip = CLIPModel(CLIPConfig(
    text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=8, bos_token_id=98, eos_token_id=99, pad_token_id=0, projection_dim=16),
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=16, projection_dim=16),
    projection_dim=16)).eval()
randomize(clip)
clip.save_pretrained(os.path.join(FIXTURES, "tiny-clip"), safe_serialization=True)
dino = ViTModel(ViTConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                          image_size=32, patch_size=16, layer_norm_eps=1e-6), add_pooling_layer=False).eval()
randomize(dino)
dino.save_pretrained(os.path.join(FIXTURES, "tiny-dino"), safe_serialization=True)
for prm in list(clip.parameters()) + list(dino.parameters()):
    prm.requires_grad_(False)

NP, CP = 24, 3
weak = torch.randn(NP, 3, 32, 32)
sentences = [[[98] + torch.randint(1, 98, (int(torch.randint(2, 6, ())),)).tolist() + [99] for _ in range(n)]
             for n in (2, 3, 2)]
with torch.no_grad():
    text_emb = [clip.get_text_features(input_ids=torch.tensor([ids])).pooler_output for cls in sentences for ids in cls]
    per_class, start = [], 0
    for cls in sentences:
        e = torch.cat(text_emb[start:start + len(cls)])
        start += len(cls)
        e = e / e.norm(dim=-1, keepdim=True)
        m = e.mean(dim=0)
        per_class.append(m / m.norm())
    cls_vectors = torch.stack(per_class)
    clip_feats = clip.get_image_features(pixel_values=weak).pooler_output
    scale = clip.logit_scale.exp().item()
    zs_probs = (scale * (clip_feats / clip_feats.norm(dim=-1, keepdim=True)) @ cls_vectors.T).softmax(dim=-1)
    dino_feats = dino(pixel_values=weak).last_hidden_state[:, 0]

kp = find_k(NP, CP, 0.2, 3)
t3c, t3p = torch.topk(zs_probs, k=3, dim=1)
chosen_all = []
for cls in range(CP):
    for rank in range(3):
        cand = [i for i in range(NP) if t3p[i, rank].item() == cls]
        if cand:
            cand.sort(key=lambda i: (-t3c[i, rank].item(), i))
            chosen_all += [(i, cls) for i in cand[:kp]]
            break
seen_p, p_idx, p_lab = set(), [], []
for i, cls in chosen_all:
    if i not in seen_p:
        seen_p.add(i)
        p_idx.append(i)
        p_lab.append(cls)

mlp_p = torch.nn.Sequential(torch.nn.Linear(24, 8), torch.nn.ReLU(), torch.nn.Linear(8, CP))
mlp_init = {k_: fl(v) for k_, v in mlp_p.state_dict().items()}
opt_p = torch.optim.Adam(mlp_p.parameters(), lr=0.01)
p_orders = []
xs, ys = dino_feats[p_idx], torch.tensor(p_lab)
for epoch in range(30):
    perm = torch.randperm(len(p_idx))
    p_orders.append(perm.tolist())
    for s_ in range(0, len(perm), 4):
        b = perm[s_:s_ + 4]
        opt_p.zero_grad()
        F.cross_entropy(mlp_p(xs[b]), ys[b]).backward()
        opt_p.step()
with torch.no_grad():
    teacher_p = mlp_p(dino_feats).argmax(dim=1)

vm = clip.vision_model
PP = 2
bound = math.sqrt(6.0 / float(3 * 16 * 16 + 32))
p_prompts = torch.empty(PP, 32).uniform_(-bound, bound)
p_init_prompts = fl(p_prompts)
p_prompts.requires_grad_(True)
p_head = cls_vectors.clone().requires_grad_(True)
norm_params = [(n_, prm) for n_, prm in clip.named_parameters()
               if n_.startswith("vision_model.") and ("layer_norm" in n_ or "layrnorm" in n_ or "layernorm" in n_)]
for _, prm in norm_params:
    prm.requires_grad_(True)


def prompted_features(x):
    h = vm.pre_layrnorm(vm.embeddings(x))
    h = torch.cat([h[:, :1], p_prompts.expand(x.shape[0], -1, -1), h[:, 1:]], dim=1)
    h = vm.encoder(inputs_embeds=h).last_hidden_state
    return clip.visual_projection(vm.post_layernorm(h[:, 0]))  # not normalised: the head reads these (cde_adapter)


def strong(i, epoch):
    x = weak[i]
    return torch.flip(x, dims=[2]) * 0.8 + 0.1 if (i + epoch) % 2 else x * 1.1 - 0.05


named = [("prompt_embeddings", p_prompts)] + norm_params + [("head.weight", p_head)]
opt_s = torch.optim.AdamW([{"params": [prm for n_, prm in named if "bias" not in n_], "weight_decay": 0.01},
                           {"params": [prm for n_, prm in named if "bias" in n_], "weight_decay": 0.0}], lr=0.01)
s_orders, s_metrics = [], []
for epoch in range(2):
    perm = torch.randperm(NP)
    s_orders.append(perm.tolist())
    batches = [perm[s_:s_ + 8] for s_ in range(0, NP, 8)]
    loss_sum, agree = 0.0, 0
    for b in batches:
        opt_s.zero_grad()
        for s_ in range(0, len(b), 3):
            mb = b[s_:s_ + 3]
            x = torch.stack([strong(i.item(), epoch) for i in mb])
            out = prompted_features(x) @ p_head.T
            loss = F.cross_entropy(out, teacher_p[mb], label_smoothing=0.1, reduction="sum")
            (loss / len(b)).backward()
            loss_sum += loss.item()
            agree += (out.argmax(dim=1) == teacher_p[mb]).sum().item()
        opt_s.step()
    s_metrics.append({"loss": loss_sum / NP, "agreement": agree / NP})
with torch.no_grad():
    final_p = (prompted_features(weak) @ p_head.T).softmax(dim=-1)
p_conf, p_labels = final_p.max(dim=1)
from safetensors.torch import save_file
save_file({"weak_views": weak.contiguous(), "clip_features": clip_feats.contiguous(), "dino_features": dino_feats.contiguous()},
          os.path.join(FIXTURES, "pipeline_io.safetensors"))
fixture["pipeline"] = {
    "n": NP, "classes": CP, "sentences": sentences, "logit_scale": scale,
    "classifier": fl(cls_vectors), "probabilities": fl(zs_probs), "k": kp, "selected_indices": p_idx, "selected_labels": p_lab,
    "alignment": {"hidden": 8, "epochs": 30, "batch": 4, "lr": 0.01, "initial": mlp_init, "orders": p_orders,
                  "trained": {k_: fl(v) for k_, v in mlp_p.state_dict().items()}},
    "teacher_labels": teacher_p.tolist(),
    "prompt_count": PP, "initial_prompts": p_init_prompts, "lr": 0.01, "logical_batch": 8, "micro_batch": 3, "epochs": 2,
    "orders": s_orders, "epoch_metrics": s_metrics,
    "final": {n_: fl(prm) for n_, prm in named},
    "labels": p_labels.tolist(), "confidences": fl(p_conf),
}

with open(OUT, "w") as f:
    json.dump(fixture, f)
print(f"pipeline: k={kp}, selected {len(p_idx)}, teacher {teacher_p.tolist()}, metrics {s_metrics}")
print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes); k={k}, selected {len(sel_idx)}, ranks {ranks}, "
      f"alignment loss {losses[0]:.4f} -> {losses[-1]:.4f}, prompt-tuning {metrics}")
