"""One-off (not CI): full-size random-weight open_clip models (ViT-B-32-quickgelu, ViT-B-16) saved in open_clip's
hub layout (open_clip_config.json + open_clip_model.safetensors, OpenAI's vocab.json / merges.txt beside them),
through `nolad embed-image` (preprocessed .f32 inputs) and `nolad embed-text`, against open_clip's encode_image
and encode_text (its own tokenizer, padded to 77) on the same weights and inputs. Prints the max abs error and
the output scale.

Run after `swift build` (or a release build):
  "$NOLAD_REFERENCE_PYTHON" reference/compare_open_clip_full_size.py .build/debug/nolad
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

nolad = sys.argv[1]
torch.manual_seed(0)


def report(what, got, want):
    err = np.abs(got - want).max()
    scale = np.abs(want).max()
    print(f"{what}: max abs error {err:.3g}, output scale {scale:.3g}, relative {err / scale:.3g}")


with tempfile.TemporaryDirectory() as tmp:
    pixels = torch.randn(2, 3, 224, 224)
    files = []
    for i in range(2):
        path = f"{tmp}/image{i}.f32"
        pixels[i].numpy().astype("<f4").tofile(path)
        files.append(path)
    for name in ["ViT-B-32-quickgelu", "ViT-B-16"]:
        model = open_clip.create_model(name, pretrained=None).eval()
        folder = f"{tmp}/{name}"
        os.makedirs(folder)
        with open(f"{folder}/open_clip_config.json", "w") as f:
            json.dump({"model_cfg": open_clip.get_model_config(name),
                       "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}}, f)
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
