"""Reference embeddings for `nolad embed-image` on real JPEGs with the bundled demo models.

Run from the repository root with the reference environment (torch, transformers, torchvision, Pillow):
    python reference/make_cli_fixtures.py
Writes Tests/DatabaseTests/Fixtures/embed_image.json: for each (model, file, view) the embedding that
transformers returns on Pillow's decoded image preprocessed as nolad's view says: "standard" is the folder's
preprocessor_config.json through AutoImageProcessor (backend "pil"), as both demo folders have one; "clip"
is torchvision's Resize(224, bicubic) + CenterCrop(224) with CLIP's mean/std (NoLA's weak view), "dino"
Resize(256) + CenterCrop(224) with ImageNet's.
"""
import json
import torch
from PIL import Image
from torchvision import transforms
from transformers import AutoImageProcessor, CLIPModel, ViTModel

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FILES = ["Demo/collection/sunset/000.jpg", "Demo/collection/night/001.jpg"]


def view(resize, crop, mean, std):
    return transforms.Compose([
        transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(crop),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def main():
    torch.set_grad_enabled(False)
    clip = CLIPModel.from_pretrained("Demo/models/tiny-clip", torch_dtype=torch.float32).eval()
    dino = ViTModel.from_pretrained("Demo/models/tiny-dino", torch_dtype=torch.float32, add_pooling_layer=False).eval()
    clip_processor = AutoImageProcessor.from_pretrained("Demo/models/tiny-clip", backend="pil")
    dino_processor = AutoImageProcessor.from_pretrained("Demo/models/tiny-dino", backend="pil")
    cases = []
    for f in FILES:
        image = Image.open(f).convert("RGB")
        x = clip_processor(images=image, return_tensors="pt")["pixel_values"]
        out = clip.get_image_features(pixel_values=x)
        out = out.pooler_output if hasattr(out, "pooler_output") else out
        cases.append({"model": "Demo/models/tiny-clip", "file": f, "view": "standard", "embedding": out[0].tolist()})
        x = dino_processor(images=image, return_tensors="pt")["pixel_values"]
        cls = dino(pixel_values=x).last_hidden_state[0, 0]
        cases.append({"model": "Demo/models/tiny-dino", "file": f, "view": "standard", "embedding": cls.tolist()})
        x = view(224, 224, CLIP_MEAN, CLIP_STD)(image)[None]
        cls = dino(pixel_values=x).last_hidden_state[0, 0]
        cases.append({"model": "Demo/models/tiny-dino", "file": f, "view": "clip", "embedding": cls.tolist()})
        x = view(256, 224, IMAGENET_MEAN, IMAGENET_STD)(image)[None]
        cls = dino(pixel_values=x).last_hidden_state[0, 0]
        cases.append({"model": "Demo/models/tiny-dino", "file": f, "view": "dino", "embedding": cls.tolist()})
    with open("Tests/DatabaseTests/Fixtures/embed_image.json", "w") as fh:
        json.dump({"cases": cases}, fh)
    print(f"wrote {len(cases)} cases")


if __name__ == "__main__":
    main()
