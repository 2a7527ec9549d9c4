"""One-off (not CI), the companion of compare_mobileclip_full_size.py (the MCi image towers in both forms):
full-size random-weight MobileCLIP models, whole, image and text towers (MobileCLIP-B: vit_base_mci_224 with a causal
text tower; MobileCLIP-S1 / S2 and MobileCLIP2-S0: fastvit_mci1 / 2 / 0 with the text tower's causal mask off)
saved in open_clip's hub layout (open_clip_config.json + open_clip_model.safetensors, MobileCLIP's preprocess_cfg,
OpenAI's vocab.json / merges.txt beside them), through `nolad embed-image` (preprocessed .f32 inputs) and
`nolad embed-text`, against open_clip's encode_image and encode_text (its own tokenizer, padded to 77) on the
same weights and inputs. Random init leaves the BatchNorm statistics at 0 / 1; they are drawn at random here
so that the fold at load is exercised. Prints the max abs error and the output scale.

Run after `swift build` (or a release build):
  "$NOLAD_REFERENCE_PYTHON" reference/compare_mobileclip_b_full_size.py .build/debug/nolad [model names]
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import open_clip
import torch
from safetensors.torch import save_file

TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "Tests", "ModelsTests", "Fixtures", "tokenizer")
TEXTS = ["a photo of a cat.", "a blurry photo of the large Boeing 747-400, flying over the sea at dusk!",
         "a photo of a dog that is lying on a sofa next to a window, with plenty of sunlight " * 4]
PREPROCESS = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "interpolation": "bilinear", "resize_mode": "shortest"}

nolad = sys.argv[1]
names = sys.argv[2:] or ["MobileCLIP-B", "MobileCLIP-S2", "MobileCLIP-S1", "MobileCLIP2-S0"]
torch.manual_seed(0)


def report(what, got, want):
    err = np.abs(got - want).max()
    scale = np.abs(want).max()
    print(f"{what}: max abs error {err:.3g}, output scale {scale:.3g}, relative {err / scale:.3g}", flush=True)


with tempfile.TemporaryDirectory() as tmp:
    for name in names:
        model = open_clip.create_model(name, pretrained=None).eval()
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n.endswith("running_mean"):
                    b.normal_(0, 0.1)
                elif n.endswith("running_var"):
                    b.uniform_(0.5, 2.0)
        cfg = open_clip.get_model_config(name)
        size = cfg["vision_cfg"]["image_size"]
        pixels = torch.rand(2, 3, size, size)
        files = []
        for i in range(2):
            path = f"{tmp}/{name}-image{i}.f32"
            pixels[i].numpy().astype("<f4").tofile(path)
            files.append(path)
        folder = f"{tmp}/{name}"
        os.makedirs(folder)
        with open(f"{folder}/open_clip_config.json", "w") as f:
            json.dump({"model_cfg": cfg, "preprocess_cfg": PREPROCESS}, f)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{folder}/open_clip_model.safetensors")
        for f in ["vocab.json", "merges.txt"]:
            shutil.copy(os.path.join(TOKENIZER, f), f"{folder}/{f}")
        with torch.no_grad():
            want = model.encode_image(pixels).numpy()
            want_text = model.encode_text(open_clip.get_tokenizer(name)(TEXTS)).numpy()
        out = subprocess.run([nolad, "embed-image", "--model", folder] + files, check=True, capture_output=True, text=True)
        report(f"{name} image (embed-image)", np.array([json.loads(l)["embedding"] for l in out.stdout.splitlines()], dtype=np.float32), want)
        out = subprocess.run([nolad, "embed-text", "--model", folder] + TEXTS, check=True, capture_output=True, text=True)
        report(f"{name} text (embed-text, {len(TEXTS)} texts)", np.array([json.loads(l)["embedding"] for l in out.stdout.splitlines()], dtype=np.float32), want_text)
        shutil.rmtree(folder)
