"""PyTorch (open_clip + timm) figures for `nolad bench`'s MobileCLIP rows: same models (random full-size
weights), threads and batch as `nolad bench --only mobileclip-b-image,...`.

Run: "$NOLAD_REFERENCE_PYTHON" reference/bench_mobileclip_torch.py --threads 2 --batch 16
- MobileCLIP-B (vit_base_mci_224, 224 px), MobileCLIP-S2 / S1 (fastvit_mci2 / 1, 256 px) and MobileCLIP2-S0
  (fastvit_mci0) image features: open_clip's encode_image on the inference (reparameterised) form, as
  MobileCLIP is deployed and as nolad folds it at load.
- MobileCLIP text features (open_clip's text tower, 77 tokens: without the causal mask S0/S1/S2 run all 77).
- The prompt-tuning step on MobileCLIP-B: 16 prompt tokens after CLS before the blocks, head on
  L2-normalised features, label-smoothing CE, backward to the prompts, every LayerNorm of the trunk and the
  head (everything else frozen).
- The MCi tuned step on MobileCLIP-S2: the last stage's BatchNorm affine and layer scales and the head
  trained; the frozen part runs under no_grad, as nolad's backward stops at the last stage.
"""
import argparse
import time

import open_clip
import torch
import torch.nn.functional as F
from timm.utils import reparameterize_model

parser = argparse.ArgumentParser()
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--batch", type=int, default=16)
parser.add_argument("--iterations", type=int, default=3)
parser.add_argument("--text-tokens", type=int, default=20)
parser.add_argument("--prompts", type=int, default=16)
parser.add_argument("--only", default=None)
args = parser.parse_args()
torch.set_num_threads(args.threads)
wanted = lambda name: args.only is None or name in args.only.split(",")
B = args.batch


def timed(body):
    body()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.iterations):
        body()
    return (time.perf_counter() - wall) / args.iterations, (time.process_time() - cpu) / args.iterations


def report(name, seconds, items, unit):
    wall, cpu = seconds
    print(f"{name:<40}{wall / items * 1000:9.1f} ms/{unit}  {items / wall:8.1f} {unit}/s   "
          f"(CPU time {cpu / items * 1000:.1f} ms/{unit} over all threads)", flush=True)


print(f"torch {torch.__version__}, open_clip {open_clip.__version__}: threads {args.threads}, batch {B}, "
      f"{args.iterations} iterations after a warm-up")
towers = [("mobileclip-b-image", "MobileCLIP-B", 224), ("mobileclip-s2-image", "MobileCLIP-S2", 256),
          ("mobileclip-s1-image", "MobileCLIP-S1", 256), ("mobileclip-s0-image", "MobileCLIP2-S0", 256)]
for key, name, size in towers:
    if not wanted(key):
        continue
    model = reparameterize_model(open_clip.create_model(name, pretrained=None).eval())
    pixels = torch.rand(B, 3, size, size)
    with torch.no_grad():
        report(f"{name} image ({size} px)", timed(lambda: model.encode_image(pixels)), B, "img")

for key, name in [("mobileclip-text", "MobileCLIP-B"), ("mobileclip-s-text", "MobileCLIP-S2")]:
    if not wanted(key):
        continue
    model = open_clip.create_model(name, pretrained=None).eval()
    n = 4 * B
    ids = torch.zeros((n, 77), dtype=torch.long)
    ids[:, 0] = 49406
    ids[:, 1:args.text_tokens - 1] = torch.randint(1, 49406, (n, args.text_tokens - 2))
    ids[:, args.text_tokens - 1] = 49407
    with torch.no_grad():
        report(f"{name} text (77 tokens, {args.text_tokens} real)", timed(lambda: model.encode_text(ids)), n, "text")

labels = torch.arange(B) % 10
if wanted("mobileclip-b-prompt-step"):
    model = open_clip.create_model("MobileCLIP-B", pretrained=None).eval()
    trunk = model.visual.trunk
    for p in model.parameters():
        p.requires_grad_(False)
    ln = [p for n, p in trunk.named_parameters() if n.startswith("norm") or ".norm" in n]
    for p in ln:
        p.requires_grad_(True)
    prompts = (torch.randn(args.prompts, 768) * 0.02).requires_grad_(True)
    head = (torch.randn(10, 512) * 0.02).requires_grad_(True)
    pixels = torch.rand(B, 3, 224, 224)

    def step():
        x = trunk._pos_embed(trunk.patch_embed(pixels))
        x = torch.cat([x[:, :1], prompts.unsqueeze(0).expand(B, -1, -1), x[:, 1:]], dim=1)
        features = trunk.head(trunk.norm(trunk.blocks(x))[:, 0])
        F.cross_entropy(F.normalize(features, dim=-1) @ head.t(), labels, label_smoothing=0.1).backward()

    report(f"MobileCLIP-B prompt-tuning step (P={args.prompts})", timed(step), B, "img")

if wanted("mobileclip-s2-tune-step"):
    model = reparameterize_model(open_clip.create_model("MobileCLIP-S2", pretrained=None).eval())
    trunk = model.visual.trunk
    for p in model.parameters():
        p.requires_grad_(False)
    last = trunk.stages[-1]
    tuned = []
    for block in last.blocks:
        for p in [block.norm.weight, block.norm.bias, block.layer_scale_1.gamma, block.layer_scale_2.gamma]:
            p.requires_grad_(True)
            tuned.append(p)
    head = (torch.randn(10, 512) * 0.02).requires_grad_(True)
    pixels = torch.rand(B, 3, 256, 256)

    def step():
        with torch.no_grad():
            x = trunk.stem(pixels)
            for stage in trunk.stages[:-1]:
                x = stage(x)
            x = last.pos_emb(last.downsample(x))
        x = last.blocks(x)
        features = trunk.forward_head(trunk.final_conv(x))
        F.cross_entropy(F.normalize(features, dim=-1) @ head.t(), labels, label_smoothing=0.1).backward()

    report("MobileCLIP-S2 tuned step (last stage norms)", timed(step), B, "img")
