"""PyTorch figures for `nolad bench`: same models (random full-size weights), threads and batch.

Run: "$NOLAD_REFERENCE_PYTHON" reference/bench_torch.py --threads 2 --batch 16
- CLIP ViT-B/32 image features, CLIP text features of the same texts padded to 77 tokens (as
  transformers' tokenizer with padding="max_length" feeds them), the prompt-tuning step (forward with
  16 prompt tokens after CLS after pre_layrnorm, head, label-smoothing CE, backward to prompts,
  vision LayerNorms and head; all other weights frozen), DINO ViT-B/16 CLS features.
"""
import argparse
import resource
import time

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

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


def timed(body):
    """Wall-clock and process CPU seconds per repetition."""
    body()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.iterations):
        body()
    return (time.perf_counter() - wall) / args.iterations, (time.process_time() - cpu) / args.iterations


def report(name, seconds, items, unit):
    wall, cpu = seconds
    print(f"{name:<36}{wall / items * 1000:9.1f} ms/{unit}  {items / wall:8.1f} {unit}/s   "
          f"(CPU time {cpu / items * 1000:.1f} ms/{unit} over all threads)")


print(f"torch {torch.__version__}: threads {args.threads}, batch {args.batch}, {args.iterations} iterations after a warm-up")
clip = CLIPModel(CLIPConfig()).eval()
dino = ViTModel(ViTConfig(), add_pooling_layer=False).eval()
B = args.batch
pixels = torch.randn(B, 3, 224, 224)

with torch.no_grad():
    if wanted("clip-image"):
        report("CLIP ViT-B/32 image", timed(lambda: clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)), B, "img")
    if wanted("clip-text"):
        n = 4 * B
        ids = torch.full((n, 77), 49407, dtype=torch.long)
        ids[:, 0] = 49406
        ids[:, 1:args.text_tokens - 1] = torch.randint(1, 49406, (n, args.text_tokens - 2))
        mask = torch.zeros(n, 77, dtype=torch.long)
        mask[:, :args.text_tokens] = 1
        report(f"CLIP text (77 tokens, {args.text_tokens} real)",
               timed(lambda: clip.text_projection(clip.text_model(input_ids=ids, attention_mask=mask).pooler_output)), n, "text")

if wanted("prompt-step"):
    vm = clip.vision_model
    for p in clip.parameters():
        p.requires_grad_(False)
    ln = [p for n, p in vm.named_parameters() if "layer_norm" in n or "layrnorm" in n or "layernorm" in n]
    for p in ln:
        p.requires_grad_(True)
    prompts = (torch.randn(args.prompts, 768) * 0.02).requires_grad_(True)
    head = (torch.randn(10, 512) * 0.02).requires_grad_(True)
    labels = torch.arange(B) % 10

    def step():
        hidden = vm.pre_layrnorm(vm.embeddings(pixels))
        hidden = torch.cat([hidden[:, :1], prompts.unsqueeze(0).expand(B, -1, -1), hidden[:, 1:]], dim=1)
        hidden = vm.encoder(inputs_embeds=hidden).last_hidden_state
        features = clip.visual_projection(vm.post_layernorm(hidden[:, 0]))
        loss = F.cross_entropy(F.normalize(features, dim=-1) @ head.t(), labels, label_smoothing=0.1)
        loss.backward()

    report(f"CLIP prompt-tuning step (P={args.prompts})", timed(step), B, "img")

with torch.no_grad():
    if wanted("dino"):
        report("DINO ViT-B/16 image", timed(lambda: dino(pixel_values=pixels).last_hidden_state[:, 0]), B, "img")
print(f"peak memory (both models, batch {B}): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
