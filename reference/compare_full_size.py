"""One-off (not CI): full-size random-weight CLIP ViT-B/32 and DINO ViT-B/16 through `nolad embed-image`
against transformers on the same weights and inputs. Prints the max abs error and the output scale.

Run after `swift build -c release --scratch-path .build-nn`:
  /work/venv/bin/python reference/compare_full_size.py .build-nn/release/nolad
"""
import json
import subprocess
import sys
import tempfile

import numpy as np
import torch
from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

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
