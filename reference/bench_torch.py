"""PyTorch figures for `nolad bench`: same models (random full-size weights), threads and batch.

Run: "$NOLAD_REFERENCE_PYTHON" reference/bench_torch.py --threads 2 --batch 16
- CLIP ViT-B/32 image features, CLIP text features of the same texts padded to 77 tokens (as
  transformers' tokenizer with padding="max_length" feeds them), the prompt-tuning step (forward with
  16 prompt tokens after CLS after pre_layrnorm, head, label-smoothing CE, backward to prompts,
  vision LayerNorms and head; all other weights frozen), DINO ViT-B/16 CLS features.
- With --mobileclip (as `nolad bench --mobileclip`, whose MobileCLIP rows are reference/bench_mobileclip_torch.py):
  CLIP ViT-B/16 from open_clip (`ViT-B-16`, random init), image features (encode_image) and the same
  prompt-tuning step on its VisionTransformer (prompts after CLS after ln_pre; ln_pre, every ln_1/ln_2,
  ln_post and the head trained).
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
parser.add_argument("--mobileclip", action="store_true", help="also the CLIP ViT-B/16 rows (clip-b16-image, clip-b16-prompt-step)")
args = parser.parse_args()
torch.set_num_threads(args.threads)
B16_ROWS = ["clip-b16-image", "clip-b16-prompt-step"]
wanted = lambda name: name in args.only.split(",") if args.only is not None else (args.mobileclip or name not in B16_ROWS)


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
if wanted("clip-b16-image") or wanted("clip-b16-prompt-step"):
    import open_clip

    b16 = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    visual = b16.visual
    if wanted("clip-b16-image"):
        with torch.no_grad():
            report("CLIP ViT-B/16 image", timed(lambda: b16.encode_image(pixels)), B, "img")
    if wanted("clip-b16-prompt-step"):
        for p in b16.parameters():
            p.requires_grad_(False)
        for n, p in visual.named_parameters():
            if n.startswith("ln_") or ".ln_" in n:
                p.requires_grad_(True)
        width = visual.conv1.out_channels
        prompts = (torch.randn(args.prompts, width) * 0.02).requires_grad_(True)
        head = (torch.randn(10, visual.output_dim) * 0.02).requires_grad_(True)
        labels = torch.arange(B) % 10

        def step():
            x = visual.conv1(pixels)                                     # (B, width, 14, 14)
            x = x.reshape(B, width, -1).permute(0, 2, 1)
            x = torch.cat([visual.class_embedding.expand(B, 1, -1), x], dim=1) + visual.positional_embedding
            x = visual.ln_pre(x)
            x = torch.cat([x[:, :1], prompts.unsqueeze(0).expand(B, -1, -1), x[:, 1:]], dim=1)
            x = visual.transformer(x)                                    # (N, L, D) in, as VisionTransformer.forward
            features = visual.ln_post(x[:, 0]) @ visual.proj
            loss = F.cross_entropy(F.normalize(features, dim=-1) @ head.t(), labels, label_smoothing=0.1)
            loss.backward()

        report(f"CLIP ViT-B/16 prompt step (P={args.prompts})", timed(step), B, "img")

print(f"peak memory (both models, batch {B}): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
