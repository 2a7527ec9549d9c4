"""Writes the MobileCLIP-B (ViT tower) and MobileCLIP text-tower parity fixtures of Tests/ModelsTests: tiny
random-weight models built from open_clip's and timm's own classes, in open_clip's hub layout, with their
reference outputs.

Run: "$NOLAD_REFERENCE_PYTHON" reference/make_mobileclip_model_fixtures.py
Writes Tests/ModelsTests/Fixtures/
The text towers have the vocabulary size of the pipeline's tiny CLIP tokenizer (520: Tests/DatabaseTests/Fixtures/
models/tiny-clip/vocab.json, start 518, end 519), so a job can run with mobileclip-vit and that tokenizer.
- mobileclip-vit/: open_clip_config.json (MobileCLIP-B's, `vit_base_mci_224`, causal text) +
  open_clip_model.safetensors. The trunk is timm's VisionTransformer with timm's ConvStem as its
  HybridEmbed backbone (proj=False, no_embed_class, token pool, head = projection), as vit_base_mci_224
  builds it, with small sizes: stem channels (16, 16, 64), kernels = strides (4, 2, 2), width 64 (one
  head of 64, timm's ViT-B head width), 2 blocks, image 32 (a 2×2 grid, the size of the pipeline's tiny DINO); BatchNorm running statistics
  random, so the fold at load is exercised.
- mobileclip-vit-bidir/: the same layout with 1 block and the text tower without its causal mask
  (`no_causal_mask: true`, as MobileCLIP S0/S1/S2), weights as torch.save (open_clip_pytorch_model.bin).
- mobileclip_io.safetensors: the inputs and, per folder, `<folder>.image_features` (encode_image) and
  `<folder>.text_features` (encode_text), unnormalised; and the prompt-tuning gradients of mobileclip-vit
  (4 prompts after CLS, before the blocks; head on L2-normalised features; label-smoothing cross-entropy;
  gradients of the prompts, the head and every LayerNorm of the trunk) from torch autograd; and `view.<i>`,
  open_clip's eval transform for the folder's preprocess_cfg (image_transform_v2: Resize of the shorter side
  to 32, bilinear, on the Pillow image, CenterCrop, ToTensor, Normalize) of the JPEGs in `VIEW_IMAGES`, with
  `view.<i>.image_features` the model's encode_image of it.
The open_clip model is open_clip.CustomTextCLIP (custom_text) with MobileCLIP-B's config, its trunk replaced by the small one;
nolad reads the folders through its loader, nothing is converted here.
"""
import json
import math
import os

import open_clip
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer_hybrid import ConvStem, _create_vision_transformer_hybrid
from torch import nn

OUT = os.path.join(os.path.dirname(__file__), "..", "Tests", "ModelsTests", "Fixtures")
torch.manual_seed(0)

EMBED = 40
IMAGE = 32
TEXT_CFG = {"context_length": 16, "vocab_size": 520, "width": 48, "heads": 4, "layers": 2}
PREPROCESS_CFG = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "interpolation": "bilinear", "resize_mode": "shortest"}


def small_trunk(depth):
    backbone = ConvStem(channels=(16, 16, 64), stride=(4, 2, 2), kernel_size=(4, 2, 2), padding=0, act_layer=nn.GELU)
    return _create_vision_transformer_hybrid(
        "vit_base_mci_224", backbone=backbone, embed_args=dict(proj=False), pretrained=False,
        embed_dim=64, depth=depth, num_heads=1, no_embed_class=True, img_size=IMAGE, num_classes=EMBED,
        global_pool="token")


def randomize(model):
    """Every parameter and BatchNorm statistic random and O(1), so that no path is degenerate."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                continue
            if ("norm" in name or "ln_" in name or ".bn." in name) and name.endswith("weight"):
                p.normal_(1, 0.2)
            elif p.ndim >= 2 and "embedding" not in name and "token" not in name and name.split(".")[-1] not in ("pos_embed", "text_projection"):
                p.normal_(0, 1 / math.sqrt(p[0].numel()))
            elif name.endswith("text_projection"):
                p.normal_(0, 1 / math.sqrt(p.shape[0]))
            else:
                p.normal_(0, 0.5)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.3)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)


def folder(name, depth, no_causal_mask, weights_file):
    text_cfg = dict(TEXT_CFG, no_causal_mask=no_causal_mask)
    model_cfg = {"embed_dim": EMBED,
                 "vision_cfg": {"timm_model_name": "vit_base_mci_224", "timm_model_pretrained": False, "timm_pool": "token",
                                "timm_proj": None, "timm_drop": 0.0, "timm_drop_path": 0.0, "image_size": IMAGE},
                 "text_cfg": text_cfg, "custom_text": True}
    full = {k: v for k, v in model_cfg.items() if k != "custom_text"}
    model = open_clip.CustomTextCLIP(**dict(full, vision_cfg=dict(model_cfg["vision_cfg"], image_size=224)))
    model.visual.trunk = small_trunk(depth)
    model = model.eval()
    randomize(model)
    path = os.path.join(OUT, name)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": PREPROCESS_CFG}, f, indent=2)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights_file.endswith(".safetensors"):
        save_file(state, os.path.join(path, weights_file))
    else:
        torch.save(state, os.path.join(path, weights_file))
    return model


def inputs():
    # Text: start 518, random ids, end 519 (the highest id: open_clip pools at argmax), then padding 0.
    ids = torch.zeros(3, 16, dtype=torch.long)
    for row, length in enumerate([5, 9, 16]):
        ids[row, 0] = 518
        ids[row, 1:length - 1] = torch.randint(1, 518, (length - 2,))
        ids[row, length - 1] = 519
    pixels = torch.rand(2, 3, IMAGE, IMAGE)
    return ids, pixels


def prompt_gradients(model, pixels, io):
    trunk = model.visual.trunk
    prompts = (torch.randn(4, 64) * 0.5).requires_grad_(True)
    head = (torch.randn(5, EMBED) * 0.3).requires_grad_(True)
    labels = torch.tensor([3, 1])
    x = trunk._pos_embed(trunk.patch_embed(pixels))          # [CLS; patches + pos_embed]
    x = torch.cat([x[:, :1], prompts.unsqueeze(0).expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
    x = trunk.norm(trunk.blocks(trunk.norm_pre(x)))
    features = trunk.head(x[:, 0])
    logits = F.normalize(features, dim=-1) @ head.t()
    loss = F.cross_entropy(logits, labels, label_smoothing=0.1)
    ln = {n: p for n, p in model.named_parameters() if n.startswith("visual.trunk.") and (".norm" in n or n.startswith("visual.trunk.norm"))}
    grads = torch.autograd.grad(loss, [prompts, head] + list(ln.values()))
    io["prompts"] = prompts
    io["head"] = head
    io["labels"] = labels
    io["prompt_features"] = features
    io["prompt_logits"] = logits
    io["prompt_loss"] = loss.reshape(1)
    io["grad.prompts"] = grads[0]
    io["grad.head.weight"] = grads[1]
    for name, g in zip(ln, grads[2:]):
        io["grad." + name] = g


VIEW_IMAGES = ["Tests/ImagingTests/Fixtures/images/larger_1000x750.jpg",
               "Tests/ImagingTests/Fixtures/images/rgb_420_progressive_odd.jpg",  # 333×211
               "Tests/ImagingTests/Fixtures/images/rgb_422.jpg",                  # 199×301
               "Tests/ImagingTests/Fixtures/images/gray.jpg"]                     # 150×230, grayscale


def views(model, io):
    from PIL import Image
    cfg = open_clip.transform.PreprocessCfg(size=IMAGE, **PREPROCESS_CFG)
    transform = open_clip.transform.image_transform_v2(cfg, is_train=False)
    root = os.path.join(os.path.dirname(__file__), "..")
    for i, path in enumerate(VIEW_IMAGES):
        pixels = transform(Image.open(os.path.join(root, path))).unsqueeze(0)
        io[f"view.{i}"] = pixels[0]
        with torch.no_grad():
            io[f"view.{i}.image_features"] = model.encode_image(pixels)[0]


def main():
    ids, pixels = inputs()
    io = {"input_ids": ids.float(), "pixel_values": pixels}
    models = [("mobileclip-vit", folder("mobileclip-vit", 2, False, "open_clip_model.safetensors")),
              ("mobileclip-vit-bidir", folder("mobileclip-vit-bidir", 1, True, "open_clip_pytorch_model.bin"))]
    for name, model in models:
        with torch.no_grad():
            io[name + ".image_features"] = model.encode_image(pixels)
            io[name + ".text_features"] = model.encode_text(ids)
    prompt_gradients(models[0][1], pixels, io)
    views(models[0][1], io)
    save_file({k: v.detach().float().contiguous() for k, v in io.items()}, os.path.join(OUT, "mobileclip_io.safetensors"))
    for k, v in io.items():
        print(k, tuple(v.shape))


if __name__ == "__main__":
    main()
