"""Writes the model-parity fixtures of Tests/ModelsTests: tiny random-weight models in Hugging Face
layout and their reference inputs/outputs from transformers.

Run: "$NOLAD_REFERENCE_PYTHON" reference/make_model_fixtures.py
Writes Tests/ModelsTests/Fixtures/{clip,dino,dinov2}/ (config.json + model.safetensors) and
{clip,dino,dinov2}_io.safetensors (float32 inputs and outputs; ids stored as float32).
- clip: CLIPModel saved as safetensors F32; text (eos_token_id 999, pooled at first EOS),
  vision, projections, and the prompt-tuning gradients.
- dino: ViTModel saved as safetensors F16 (references computed with the F16-rounded weights).
- dinov2: Dinov2Model saved as pytorch_model.bin (torch.save zip + pickle), run on a 56x70 input so that position embeddings are interpolated.
"""
import math
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model, ViTConfig, ViTModel)

OUT = os.path.join(os.path.dirname(__file__), "..", "Tests", "ModelsTests", "Fixtures")
torch.manual_seed(0)


def randomize(model):
    """Every parameter random and O(1), so that no path is degenerate (LayerNorm weights near 1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                continue
            if p.ndim >= 2 and "embedding" not in name and "token" not in name:
                fan_in = p[0].numel()
                p.normal_(0, 1 / math.sqrt(fan_in))
            elif "norm" in name and name.endswith("weight") or "lambda1" in name:
                p.normal_(1, 0.2)
            else:
                p.normal_(0, 0.5)


def save_io(name, tensors):
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, os.path.join(OUT, name))


def clip_fixture():
    config = CLIPConfig(
        text_config=dict(vocab_size=1000, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=998,
                         eos_token_id=999, pad_token_id=0, projection_dim=40),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=40),
        projection_dim=40)
    model = CLIPModel(config).eval()
    randomize(model)
    model.save_pretrained(os.path.join(OUT, "clip"), safe_serialization=True)

    io = {}
    # text: BOS, random ids, EOS, then padding; transformers runs all 16 positions.
    ids = torch.zeros(3, 16, dtype=torch.long)
    for row, length in enumerate([5, 9, 16]):
        ids[row, 0] = 998
        ids[row, 1:length - 1] = torch.randint(1, 998, (length - 2,))
        ids[row, length - 1] = 999
    with torch.no_grad():
        text = model.text_model(input_ids=ids)
        io["input_ids"] = ids
        io["text_pooled"] = text.pooler_output
        io["text_features"] = model.text_projection(text.pooler_output)

        pixels = torch.randn(2, 3, 32, 32)
        vision = model.vision_model(pixel_values=pixels, output_hidden_states=True)
        io["pixel_values"] = pixels
        io["vision_hidden_1"] = vision.hidden_states[1]       # after encoder layer 0
        io["vision_last_hidden"] = vision.last_hidden_state
        io["vision_pooled"] = vision.pooler_output
        io["image_features"] = model.visual_projection(vision.pooler_output)
        io["logit_scale"] = model.logit_scale.reshape(1)

    # prompt tuning: P prompts after CLS (after pre_layrnorm), head on L2-normalised features,
    # label-smoothing cross-entropy; gradients to prompts, every vision LayerNorm and the head.
    vm = model.vision_model
    prompts = (torch.randn(4, 64) * 0.5).requires_grad_(True)
    head = (torch.randn(5, 40) * 0.3).requires_grad_(True)
    labels = torch.tensor([3, 1])
    hidden = vm.pre_layrnorm(vm.embeddings(pixels))
    hidden = torch.cat([hidden[:, :1], prompts.unsqueeze(0).expand(2, -1, -1), hidden[:, 1:]], dim=1)
    hidden = vm.encoder(inputs_embeds=hidden).last_hidden_state
    features = model.visual_projection(vm.post_layernorm(hidden[:, 0]))
    logits = F.normalize(features, dim=-1) @ head.t()
    loss = F.cross_entropy(logits, labels, label_smoothing=0.1)
    ln_params = {n: p for n, p in model.named_parameters()
                 if n.startswith("vision_model.") and ("layer_norm" in n or "layrnorm" in n or "layernorm" in n)}
    grads = torch.autograd.grad(loss, [prompts, head] + list(ln_params.values()))
    io["prompts"] = prompts
    io["head"] = head
    io["labels"] = labels
    io["prompt_features"] = features
    io["prompt_logits"] = logits
    io["prompt_loss"] = loss.reshape(1)
    io["grad.prompts"] = grads[0]
    io["grad.head.weight"] = grads[1]
    for name, g in zip(ln_params, grads[2:]):
        io["grad." + name] = g
    save_io("clip_io.safetensors", io)


def dino_fixture():
    config = ViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                       image_size=32, patch_size=8)
    model = ViTModel(config).eval()
    randomize(model)
    model = model.half()
    model.save_pretrained(os.path.join(OUT, "dino"), safe_serialization=True)
    model = model.float()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    save_io("dino_io.safetensors", {"pixel_values": pixels, "hidden_1": out.hidden_states[1],
                                    "last_hidden": out.last_hidden_state, "cls": out.last_hidden_state[:, 0]})


def dinov2_fixture():
    config = Dinov2Config(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2,
                          image_size=42, patch_size=14)
    model = Dinov2Model(config).eval()
    randomize(model)
    # transformers 5 always writes safetensors, and its in-memory state_dict names differ from the checkpoint
    # names (it converts on save); so: save_pretrained, then re-save the on-disk tensors with torch.save.
    folder = os.path.join(OUT, "dinov2")
    model.save_pretrained(folder)
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    os.remove(os.path.join(folder, "model.safetensors"))
    torch.save(tensors, os.path.join(folder, "pytorch_model.bin"))
    pixels = torch.randn(2, 3, 56, 70)
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    save_io("dinov2_io.safetensors", {"pixel_values": pixels, "hidden_1": out.hidden_states[1],
                                      "last_hidden": out.last_hidden_state, "cls": out.pooler_output})


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    clip_fixture()
    dino_fixture()
    dinov2_fixture()
    print("fixtures written to", os.path.abspath(OUT))
