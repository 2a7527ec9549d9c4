"""One-off (not CI): full-size random-weight CLIP ViT-B/32 and DINO ViT-B/16 through `nolad embed-image`,
and CLIP's text tower through `nolad embed-text` (OpenAI's vocabulary from the tokenizer fixtures; transformers
pads to 77 tokens, nolad runs up to EOS), against transformers on the same weights and inputs.
Prints the max abs error and the output scale.

Run after `swift build -c release --scratch-path .build-nn`:
  "$NOLAD_REFERENCE_PYTHON" reference/compare_full_size.py .build-nn/release/nolad
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "Tests", "ModelsTests", "Fixtures", "tokenizer")
TEXTS = ["a photo of a cat.", "a blurry photo of the large Boeing 747-400, flying over the sea at dusk!",
         "a photo of a dog that is lying on a sofa next to a window, with plenty of sunlight " * 4]

nolad = sys.argv[1]
torch.manual_seed(0)
with tempfile.TemporaryDirectory() as tmp:
    pixels = torch.randn(2, 3, 224, 224)
    files = []
    for i in range(2):
        path = f"{tmp}/image{i}.f32"
        pixels[i].numpy().astype("<f4").tofile(path)
        files.append(path)
    for name, model in [("CLIP ViT-B/32", CLIPModel(CLIPConfig())), ("DINO ViT-B/16", ViTModel(ViTConfig()))]:
        model.eval().save_pretrained(f"{tmp}/model", safe_serialization=True)
        with torch.no_grad():
            if isinstance(model, CLIPModel):
                want = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output).numpy()
            else:
                want = model(pixel_values=pixels).last_hidden_state[:, 0].numpy()
        out = subprocess.run([nolad, "embed-image", "--model", f"{tmp}/model"] + files, check=True, capture_output=True, text=True)
        got = np.array([json.loads(line)["embedding"] for line in out.stdout.splitlines()], dtype=np.float32)
        err = np.abs(got - want).max()
        scale = np.abs(want).max()
        print(f"{name}: max abs error {err:.3g}, output scale {scale:.3g}, relative {err / scale:.3g}")
        if isinstance(model, CLIPModel):
            for f in ["vocab.json", "merges.txt"]:
                shutil.copy(os.path.join(TOKENIZER, f), f"{tmp}/model/{f}")
            tokenizer = CLIPTokenizer(f"{tmp}/model/vocab.json", f"{tmp}/model/merges.txt")
            batch = tokenizer(TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            with torch.no_grad():
                want = model.text_projection(model.text_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).pooler_output).numpy()
            out = subprocess.run([nolad, "embed-text", "--model", f"{tmp}/model"] + TEXTS, check=True, capture_output=True, text=True)
            got = np.array([json.loads(line)["embedding"] for line in out.stdout.splitlines()], dtype=np.float32)
            err = np.abs(got - want).max()
            scale = np.abs(want).max()
            print(f"CLIP text (embed-text, {len(TEXTS)} texts): max abs error {err:.3g}, output scale {scale:.3g}, relative {err / scale:.3g}")
