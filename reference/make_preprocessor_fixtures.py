"""Writes the preprocessor_config.json parity fixtures of Tests/MethodTests: model folders whose image
processor differs from what config.json alone implies, and the embeddings transformers gives on real JPEGs.

Run: "$NOLAD_REFERENCE_PYTHON" reference/make_preprocessor_fixtures.py
Writes Tests/MethodTests/Fixtures/preprocessor/:
- dinov2-518/: a random-weight tiny Dinov2Model (safetensors F16) whose config.json says image_size 518
  (37×37 position embeddings) and whose preprocessor_config.json is the hub's BitImageProcessor layout:
  shorter side 256, bicubic, centre crop 224, ImageNet mean/std.
- processors/*.json: further preprocessor configs, each used with one model folder (the tiny CLIP and DINO
  of Tests/ModelsTests/Fixtures, and dinov2-518): non-default crops, mean/std, bilinear and nearest
  resampling, exact (squashing) resizes, a crop larger than the resize (padding), rescale without normalise,
  legacy feature-extractor files.
- cases.json: for every (folder, processor, JPEG) the embedding of transformers' AutoImageProcessor with
  backend="pil" (Pillow resize; nolad's reference) + the model (CLIP get_image_features, DINO/DINOv2 the
  final-norm CLS token), and the processed pixel values where they are small (the tiny CLIP and DINO on the
  first two JPEGs: pixel_values.safetensors, named by the case's "pixel_values").
- nearest_sweep.json: hashes of Pillow's NEAREST resize of synthetic images to 45 sizes. It prints, for information,
  how far AutoImageProcessor's default torchvision backend is from the Pillow one.
"""
import json
import math
import os
import shutil
import tempfile

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoImageProcessor, CLIPModel, Dinov2Config, Dinov2Model, ViTModel

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
OUT = os.path.join(ROOT, "Tests", "MethodTests", "Fixtures", "preprocessor")
IMAGES = ["Tests/ImagingTests/Fixtures/images/larger_1000x750.jpg",
          "Tests/ImagingTests/Fixtures/images/rgb_420_progressive_odd.jpg",  # 333×211
          "Tests/ImagingTests/Fixtures/images/rgb_422.jpg",                  # 199×301
          "Tests/ImagingTests/Fixtures/images/gray.jpg"]                     # 150×230, grayscale
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
torch.manual_seed(0)

# (name, model folder relative to the repository root, preprocessor_config.json contents)
CLIP = "Tests/ModelsTests/Fixtures/clip"      # image_size 32, patch 8
DINO = "Tests/ModelsTests/Fixtures/dino"      # ViTModel, image_size 32, patch 8
DINOV2 = "Tests/MethodTests/Fixtures/preprocessor/dinov2-518"
PROCESSORS = [
    # The hub's DINOv2 layout (facebook/dinov2-*): 518 in config.json, 256 → 224 here.
    ("dinov2_hub", DINOV2, {
        "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": IMAGENET_MEAN,
        "image_processor_type": "BitImageProcessor", "image_std": IMAGENET_STD, "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 256}}),
    # DINOv2 fed a non-square crop (both sides multiples of 14), bilinear, no class named (model_type dinov2).
    ("dinov2_rect_bilinear", DINOV2, {
        "crop_size": {"height": 112, "width": 168}, "do_center_crop": True, "image_mean": [0.5, 0.4, 0.3],
        "image_std": [0.2, 0.25, 0.3], "resample": 2, "size": {"shortest_edge": 150}}),
    # CLIP with a non-default crop rule: shorter side 40, crop 32, its own mean/std.
    ("clip_crop_mean", CLIP, {
        "crop_size": {"height": 32, "width": 32}, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.3, 0.35], "image_processor_type": "CLIPImageProcessor",
        "resample": 3, "size": {"shortest_edge": 40}, "processor_class": "CLIPProcessor"}),
    # Legacy CLIPFeatureExtractor file: int size (shorter side) and int crop.
    ("clip_legacy", CLIP, {
        "crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 37}),
    # Crop larger than the resize: transformers pads with black (ceil of the odd difference on top/left).
    ("clip_pad_nearest", CLIP, {
        "crop_size": {"height": 32, "width": 32}, "do_center_crop": True, "image_processor_type": "CLIPImageProcessorFast",
        "resample": 0, "size": {"shortest_edge": 27}}),
    # Exact resize, no crop, rescale without normalise.
    ("clip_exact_bilinear_no_normalize", CLIP, {
        "do_center_crop": False, "do_normalize": False, "do_rescale": True, "rescale_factor": 0.0078125,
        "image_processor_type": "CLIPImageProcessor", "resample": 2, "size": {"height": 32, "width": 32}}),
    # DINO ViT as on the hub (facebook/dino-vitb16): ViTFeatureExtractor, int size = squash to size × size, bilinear.
    ("dino_hub", DINO, {
        "do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
        "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "resample": 2, "size": 32}),
]


def randomize(model):
    """Every parameter random and O(1), so that no path is degenerate (as make_model_fixtures.py)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "embedding" not in name and "token" not in name:
                p.normal_(0, 1 / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight") or "lambda1" in name:
                p.normal_(1, 0.2)
            else:
                p.normal_(0, 0.5)


def dinov2_518():
    folder = os.path.join(ROOT, DINOV2)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                          image_size=518, patch_size=14)
    model = Dinov2Model(config).eval()
    randomize(model)
    model.half().save_pretrained(folder, safe_serialization=True)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as fh:
        json.dump(dict(PROCESSORS[0][2]), fh, indent=2, sort_keys=True)


def load_model(folder):
    with open(os.path.join(folder, "config.json")) as fh:
        kind = json.load(fh)["model_type"]
    if kind == "clip":
        model = CLIPModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
        return lambda x: model.get_image_features(pixel_values=x)
    cls = Dinov2Model if kind == "dinov2" else ViTModel
    kwargs = {} if kind == "dinov2" else {"add_pooling_layer": False}
    model = cls.from_pretrained(folder, torch_dtype=torch.float32, **kwargs).eval()
    return lambda x: model(pixel_values=x).last_hidden_state[:, 0]


def features(out):
    return out.pooler_output if hasattr(out, "pooler_output") else out


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def nearest_sweep():
    """Pillow's NEAREST resize of synthetic images (pixel (x, y, c) = (7x + 13y + 29c + xy) mod 256) to many
    sizes, up and down, odd ratios and 1-pixel sides: FNV-1a 64 of the RGB bytes of each result."""
    cases = []
    for (w, h) in [(37, 23), (5, 300), (300, 5), (1, 1), (64, 64)]:
        x, y = np.meshgrid(np.arange(w), np.arange(h))
        rgb = np.stack([(7 * x + 13 * y + 29 * c + x * y) % 256 for c in range(3)], axis=-1).astype(np.uint8)
        image = Image.fromarray(rgb, "RGB")
        for (ow, oh) in [(1, 1), (3, 7), (16, 16), (32, 17), (100, 3), (91, 203), (224, 224), (w, 2 * h + 1), (2 * w + 3, h)]:
            out = image.resize((ow, oh), Image.Resampling.NEAREST)
            cases.append({"width": w, "height": h, "out_width": ow, "out_height": oh, "fnv1a64": fnv1a64(out.tobytes())})
    return cases


def main():
    torch.set_grad_enabled(False)
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(os.path.join(OUT, "processors"))
    dinov2_518()
    cases, pixels, worst_fast = [], {}, 0.0
    for name, folder, processor in PROCESSORS:
        with open(os.path.join(OUT, "processors", name + ".json"), "w") as fh:
            json.dump(processor, fh, indent=2, sort_keys=True)
        # The folder as a user has it: the model's files plus this preprocessor_config.json.
        with tempfile.TemporaryDirectory() as tmp:
            for f in os.listdir(os.path.join(ROOT, folder)):
                if f != "preprocessor_config.json":
                    os.symlink(os.path.join(ROOT, folder, f), os.path.join(tmp, f))
            with open(os.path.join(tmp, "preprocessor_config.json"), "w") as fh:
                json.dump(processor, fh)
            embed = load_model(tmp)
            pil = AutoImageProcessor.from_pretrained(tmp, backend="pil")
            fast = AutoImageProcessor.from_pretrained(tmp)
            for image_path in IMAGES:
                image = Image.open(os.path.join(ROOT, image_path)).convert("RGB")
                x = pil(images=image, return_tensors="pt")["pixel_values"]
                e = features(embed(x))[0]
                case = {"name": name, "model": folder, "processor": "processors/" + name + ".json", "file": image_path,
                        "pixel_shape": list(x.shape[1:]), "embedding": e.tolist()}
                if x.numel() <= 3 * 32 * 32 and image_path in IMAGES[:2]:
                    case["pixel_values"] = f"case{len(cases)}"
                    pixels[case["pixel_values"]] = x[0].float().contiguous()
                cases.append(case)
                xf = fast(images=image, return_tensors="pt")["pixel_values"]
                if xf.shape == x.shape:
                    ef = features(embed(xf))[0]
                    rel = ((ef - e).abs().max() / e.abs().max()).item()
                    worst_fast = max(worst_fast, rel)
                    print(f"{name} {os.path.basename(image_path)} {tuple(x.shape[1:])}: torchvision backend vs pil: "
                          f"pixels max {(xf - x).abs().max().item():.3g}, embedding relative {rel:.3g}")
                else:
                    print(f"{name} {os.path.basename(image_path)}: torchvision backend gives {tuple(xf.shape[1:])}, pil {tuple(x.shape[1:])}")
    with open(os.path.join(OUT, "cases.json"), "w") as fh:
        json.dump({"cases": cases, "torchvision_backend_worst_relative": worst_fast}, fh)
    save_file(pixels, os.path.join(OUT, "pixel_values.safetensors"))
    with open(os.path.join(OUT, "nearest_sweep.json"), "w") as fh:
        json.dump({"cases": nearest_sweep()}, fh)
    print(f"wrote {len(cases)} cases to {OUT}; torchvision backend worst embedding difference {worst_fast:.3g} relative")


if __name__ == "__main__":
    main()
