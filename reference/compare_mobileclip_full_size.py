"""One-off (not CI): the full-size MCi image towers (MobileCLIP-S1 = fastvit_mci1, MobileCLIP-S2 = fastvit_mci2,
MobileCLIP2-S0 = fastvit_mci0, the tower of MobileCLIP-S0) with random weights, in both checkpoint forms,
against nolad. Every parameter, BatchNorm statistic and layer scale is drawn at random (the inits would leave
layer scales at 1e-5 and BatchNorms at identity, hiding most of the tower). Prints the max abs error and the
output scale per tower and form.

Two ways to run nolad:
  "$NOLAD_REFERENCE_PYTHON" reference/compare_mobileclip_full_size.py embed-image .build/debug/nolad
      writes open_clip hub folders (open_clip_config.json + open_clip_model.safetensors, training form and
      reparameterised) and runs `nolad embed-image --model <folder>` on preprocessed .f32 inputs;
  "$NOLAD_REFERENCE_PYTHON" reference/compare_mobileclip_full_size.py dump DIR
      writes DIR/<tower>-<form>.safetensors (the trunk under `visual.trunk.`, F32) and DIR/<tower>_io.safetensors
      (pixels (2,3,256,256) and each form's encode_image), for a harness that loads `MCiModel` directly;
      then "$NOLAD_REFERENCE_PYTHON" reference/compare_mobileclip_full_size.py report DIR reads the
      harness's DIR/<tower>-<form>.nolad.f32 and prints the errors.
"""
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import open_clip
import torch
from safetensors.torch import save_file
from timm.utils import reparameterize_model

TOWERS = [("MobileCLIP2-S0", "fastvit_mci0"), ("MobileCLIP-S1", "fastvit_mci1"), ("MobileCLIP-S2", "fastvit_mci2")]
torch.manual_seed(0)


def randomize(trunk):
    with torch.no_grad():
        for name, p in list(trunk.named_parameters()) + list(trunk.named_buffers()):
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                p.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                p.normal_(0, 0.1)
            elif name.endswith("gamma"):
                p.uniform_(0.05, 0.3)
            elif p.ndim >= 2:
                p.normal_(0, 1 / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.normal_(1, 0.1)
            else:
                p.normal_(0, 0.1)


def report(what, got, want):
    err = np.abs(got - want).max()
    scale = np.abs(want).max()
    print(f"{what}: max abs error {err:.3g}, output scale {scale:.3g}, relative {err / scale:.3g}")


def towers():
    """(name, tower, form, open_clip model, its encode_image of `pixels`) for both forms of each tower."""
    pixels = torch.randn(2, 3, 256, 256)
    for name, tower in TOWERS:
        model = open_clip.create_model(name, pretrained=None).eval()
        randomize(model.visual.trunk)
        with torch.no_grad():
            train = model.encode_image(pixels)
        yield name, tower, "train", model, train, pixels
        model = reparameterize_model(model)
        with torch.no_grad():
            reparam = model.encode_image(pixels)
        yield name, tower, "reparam", model, reparam, pixels


def main():
    mode = sys.argv[1]
    if mode == "report":
        folder = sys.argv[2]
        from safetensors.numpy import load_file
        for _, tower in TOWERS:
            io = load_file(f"{folder}/{tower}_io.safetensors")
            for form in ["train", "reparam"]:
                got = np.fromfile(f"{folder}/{tower}-{form}.nolad.f32", dtype="<f4").reshape(io[form + ".features"].shape)
                report(f"{tower} ({form} form)", got, io[form + ".features"])
        return
    if mode == "dump":
        folder = sys.argv[2]
        os.makedirs(folder, exist_ok=True)
        io = {}
        for name, tower, form, model, features, pixels in towers():
            state = {k: v.contiguous() for k, v in model.state_dict().items() if k.startswith("visual.trunk.")}
            save_file(state, f"{folder}/{tower}-{form}.safetensors")
            io.setdefault(tower, {"pixel_values": pixels})[form + ".features"] = features
            if form == "reparam":
                save_file(io[tower], f"{folder}/{tower}_io.safetensors")
        return
    assert mode == "embed-image", __doc__
    nolad = sys.argv[2]
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        first = True
        for name, tower, form, model, features, pixels in towers():
            if first:
                for i in range(2):
                    path = f"{tmp}/image{i}.f32"
                    pixels[i].numpy().astype("<f4").tofile(path)
                    files.append(path)
                first = False
            folder = f"{tmp}/{name}-{form}"
            os.makedirs(folder)
            with open(f"{folder}/open_clip_config.json", "w") as f:
                json.dump({"model_cfg": open_clip.get_model_config(name),
                           "preprocess_cfg": {"mean": [0, 0, 0], "std": [1, 1, 1]}}, f)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{folder}/open_clip_model.safetensors")
            out = subprocess.run([nolad, "embed-image", "--model", folder] + files, check=True, capture_output=True, text=True)
            got = np.array([json.loads(line)["embedding"] for line in out.stdout.splitlines()], dtype=np.float32)
            report(f"{name} ({tower}, {form} form, embed-image)", got, features.numpy())


if __name__ == "__main__":
    main()
