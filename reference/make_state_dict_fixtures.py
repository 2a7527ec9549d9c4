"""Writes Tests/ModelsTests/Fixtures/{vit,dinov2}-state-dict/: tiny random ViTModel and Dinov2Model folders whose
pytorch_model.bin is `torch.save(model.state_dict())` under transformers >= 5. That state dict uses transformers 5's
in-memory names (`layers.0.attention.q_proj.weight` for ViT, `encoder.layer.0.attention.q_proj.weight` for
DINOv2), not the checkpoint names `save_pretrained` writes; nolad must read both. Also writes
state_dict_io.safetensors: inputs and the CLS output of each model.

Run: "$NOLAD_REFERENCE_PYTHON" reference/make_state_dict_fixtures.py
"""
import math
import os

import torch
from safetensors.torch import save_file
from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

OUT = os.path.join(os.path.dirname(__file__), "..", "Tests", "ModelsTests", "Fixtures")
torch.manual_seed(0)


def randomize(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "embedding" not in name and "token" not in name:
                p.normal_(0, 1 / math.sqrt(p[0].numel()))
            elif ("norm" in name and name.endswith("weight")) or "lambda1" in name:
                p.normal_(1, 0.2)
            else:
                p.normal_(0, 0.5)


def folder(name, model):
    path = os.path.join(OUT, name)
    os.makedirs(path, exist_ok=True)
    model.config.to_json_file(os.path.join(path, "config.json"))
    state = model.state_dict()
    assert any(".q_proj." in k for k in state), "expected transformers 5's in-memory names"
    torch.save(state, os.path.join(path, "pytorch_model.bin"))


def main():
    io = {}
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             image_size=32, patch_size=8), add_pooling_layer=False).eval()
    randomize(vit)
    folder("vit-state-dict", vit)
    dinov2 = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                      image_size=28, patch_size=14)).eval()
    randomize(dinov2)
    folder("dinov2-state-dict", dinov2)
    pixels = torch.randn(2, 3, 32, 32)
    pixels2 = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        io["vit.pixel_values"] = pixels
        io["vit.cls"] = vit(pixel_values=pixels).last_hidden_state[:, 0]
        io["dinov2.pixel_values"] = pixels2
        io["dinov2.cls"] = dinov2(pixel_values=pixels2).pooler_output
    save_file({k: v.float().contiguous() for k, v in io.items()}, os.path.join(OUT, "state_dict_io.safetensors"))


if __name__ == "__main__":
    main()
