"""Writes the open_clip and MetaCLIP parity fixtures of Tests/ModelsTests: tiny random-weight models in
open_clip's hub layout and in Hugging Face's MetaCLIP layout, with their reference outputs.

Run: "$NOLAD_REFERENCE_PYTHON" reference/make_open_clip_fixtures.py
Writes Tests/ModelsTests/Fixtures/
- openclip-quickgelu/: open_clip_config.json + open_clip_model.safetensors (open_clip.CLIP, quick_gelu true);
- openclip-gelu/: open_clip_config.json + open_clip_pytorch_model.bin (torch.save(state_dict), nn.GELU);
- metaclip/: a transformers CLIPModel with MetaCLIP's config values (GELU in both towers, the legacy
  eos_token_id 2, so the text is pooled at the highest id);
- openclip_io.safetensors: the inputs and, per folder, `<folder>.image_features` (encode_image /
  get_image_features) and `<folder>.text_features` (encode_text / get_text_features), unnormalised.
The folders are written as open_clip's `push_to_hf_hub` and transformers' `save_pretrained` write them;
nolad reads them through its loaders, nothing is converted here.
"""
import json
import math
import os

import open_clip
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

OUT = os.path.join(os.path.dirname(__file__), "..", "Tests", "ModelsTests", "Fixtures")
torch.manual_seed(0)

# Small towers of the ViT-B layout: patch 8 on 32 px, widths 64 / 48, two blocks each.
MODEL_CFG = {
    "embed_dim": 40,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 48, "heads": 4, "layers": 2},
}
PREPROCESS_CFG = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}


def randomize(model):
    """Every parameter random and O(1), so that no path is degenerate (LayerNorm weights near 1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                continue
            if p.ndim >= 2 and "embedding" not in name and "token" not in name and "proj" != name.split(".")[-1]:
                p.normal_(0, 1 / math.sqrt(p[0].numel()))
            elif ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.normal_(1, 0.2)
            elif name.endswith("proj") or name.endswith("text_projection"):
                p.normal_(0, 1 / math.sqrt(p.shape[0]))
            else:
                p.normal_(0, 0.5)


def inputs():
    # Text: start 998, random ids, end 999 (the highest id: open_clip pools at argmax), then padding 0.
    ids = torch.zeros(3, 16, dtype=torch.long)
    for row, length in enumerate([5, 9, 16]):
        ids[row, 0] = 998
        ids[row, 1:length - 1] = torch.randint(1, 998, (length - 2,))
        ids[row, length - 1] = 999
    pixels = torch.randn(2, 3, 32, 32)
    return ids, pixels


def open_clip_folder(name, quick_gelu, weights_file):
    cfg = dict(MODEL_CFG, quick_gelu=quick_gelu)
    model = open_clip.CLIP(**cfg).eval()
    randomize(model)
    folder = os.path.join(OUT, name)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": cfg, "preprocess_cfg": PREPROCESS_CFG}, f, indent=2)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = os.path.join(folder, weights_file)
    if weights_file.endswith(".safetensors"):
        save_file(state, path)
    else:
        torch.save(state, path)
    return model


def metaclip_folder():
    config = CLIPConfig(
        text_config=dict(vocab_size=1000, hidden_size=48, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, hidden_act="gelu",
                         bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=40),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, hidden_act="gelu", projection_dim=40),
        projection_dim=40)
    model = CLIPModel(config).eval()
    randomize(model)
    model.save_pretrained(os.path.join(OUT, "metaclip"), safe_serialization=True)
    return model


def main():
    ids, pixels = inputs()
    io = {"input_ids": ids.float(), "pixel_values": pixels}
    for name, model in [("openclip-quickgelu", open_clip_folder("openclip-quickgelu", True, "open_clip_model.safetensors")),
                        ("openclip-gelu", open_clip_folder("openclip-gelu", False, "open_clip_pytorch_model.bin"))]:
        with torch.no_grad():
            io[name + ".image_features"] = model.encode_image(pixels)
            io[name + ".text_features"] = model.encode_text(ids)
    meta = metaclip_folder()
    with torch.no_grad():
        # transformers 5 returns the projected features as the pooler output.
        io["metaclip.image_features"] = meta.get_image_features(pixel_values=pixels).pooler_output
        io["metaclip.text_features"] = meta.get_text_features(input_ids=ids).pooler_output
    save_file({k: v.detach().float().contiguous() for k, v in io.items()}, os.path.join(OUT, "openclip_io.safetensors"))
    for k, v in io.items():
        print(k, tuple(v.shape))


if __name__ == "__main__":
    main()
