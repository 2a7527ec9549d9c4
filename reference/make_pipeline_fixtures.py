"""Fixtures of the pipeline's end-to-end database tests (Tests/DatabaseTests/Fixtures):

    "$NOLAD_REFERENCE_PYTHON" reference/make_pipeline_fixtures.py

models/tiny-clip  CLIPModel, random weights, 32x32 images (patch 16), with a byte-level tokenizer: vocab.json
                  holds the 512 byte symbols of CLIP's BPE (with and without </w>) and the two special tokens,
                  merges.txt a handful of merges, so text is tokenised exactly as CLIP's tokenizer would with
                  that vocabulary (transformers' CLIPTokenizer loads the folder; checked below).
models/tiny-dino  ViTModel (DINO layout), random weights, 32x32 images, patch 16.
collection/<class>/*.{jpg,png}  3 classes x 6 small images (colour blobs on noise), plus red_ball/bad.jpg, a
                  truncated JPEG (an unreadable image the labels table must report).
Random weights give random labels: these fixtures test the plumbing, not accuracy (the demo does that).
"""
import io
import json
import os

import numpy as np
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel
import sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import byte_alphabet  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Tests", "DatabaseTests", "Fixtures")


def tokenizer_files(folder):
    units = list(byte_alphabet().values())
    merges = [("a", "t</w>"), ("o", "f</w>"), ("p", "h"), ("ph", "o"), ("t", "o</w>"), ("pho", "to</w>")]
    vocab = units + [u + "</w>" for u in units] + [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return len(vocab)


def main():
    torch.manual_seed(0)
    clip_dir = os.path.join(OUT, "models", "tiny-clip")
    dino_dir = os.path.join(OUT, "models", "tiny-dino")
    os.makedirs(clip_dir, exist_ok=True)
    os.makedirs(dino_dir, exist_ok=True)
    vocab_size = tokenizer_files(clip_dir)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=24, bos_token_id=vocab_size - 2,
                         eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=16, hidden_act="quick_gelu"),
        projection_dim=16)
    clip = CLIPModel(config).eval()
    clip.save_pretrained(clip_dir, safe_serialization=True)
    tok = CLIPTokenizer.from_pretrained(clip_dir)
    ids = tok("a photo of a cat.")["input_ids"]
    assert ids[0] == vocab_size - 2 and ids[-1] == vocab_size - 1 and max(ids) < vocab_size, ids
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        p = os.path.join(clip_dir, name)
        if os.path.exists(p):
            os.remove(p)

    dino = ViTModel(ViTConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                              image_size=32, patch_size=16, qkv_bias=True), add_pooling_layer=False).eval()
    dino.save_pretrained(dino_dir, safe_serialization=True)

    rng = np.random.default_rng(0)
    colours = {"red ball": (200, 40, 40), "green leaf": (40, 180, 60), "blue sky": (50, 80, 210)}
    for c, (r, g, b) in colours.items():
        folder = os.path.join(OUT, "collection", c.replace(" ", "_"))
        os.makedirs(folder, exist_ok=True)
        for i in range(6):
            w, h = int(rng.integers(36, 64)), int(rng.integers(36, 64))
            img = rng.integers(0, 80, size=(h, w, 3)).astype(np.int32)
            cy, cx, rad = h // 2 + int(rng.integers(-6, 7)), w // 2 + int(rng.integers(-6, 7)), int(rng.integers(10, 16))
            yy, xx = np.mgrid[0:h, 0:w]
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < rad ** 2
            img[mask] = np.clip(np.array([r, g, b]) + rng.integers(-30, 30, size=(mask.sum(), 3)), 0, 255)
            pil = Image.fromarray(img.astype(np.uint8))
            if i % 3 == 2:
                pil.save(os.path.join(folder, f"{i:02d}.png"))
            else:
                pil.save(os.path.join(folder, f"{i:02d}.jpg"), quality=90)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, size=(40, 40, 3)).astype(np.uint8)).save(buf, format="JPEG")
    with open(os.path.join(OUT, "collection", "red_ball", "bad.jpg"), "wb") as f:
        f.write(buf.getvalue()[:200])
    print("wrote", OUT)


if __name__ == "__main__":
    main()
