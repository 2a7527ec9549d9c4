"""Writes the MCi (MobileCLIP S0/S1/S2 image tower, timm `fastvit_mci*`) parity fixtures of Tests/ModelsTests:
a tiny random-weight timm FastVit with every block kind of the MCi towers, in both checkpoint forms,
with its reference outputs and the gradients of nolad's tuned variant.

Run: "$NOLAD_REFERENCE_PYTHON" reference/make_mobileclip_fixtures.py
Writes Tests/ModelsTests/Fixtures/
- mci-train.safetensors: the training-form state dict (MobileOneBlock conv_kxk/conv_scale/identity branches,
  ReparamLargeKernelConv large_conv/small_conv, RepMixer norm/mixer/layer_scale, RepCPE pos_enc), under
  open_clip's prefix `visual.trunk.` (open_clip's TimmModel with timm_proj null keeps the trunk's own
  classifier head `head.fc` as the projection, so encode_image = trunk(x));
- mci-reparam.safetensors: the same model after `timm.utils.reparameterize_model` (reparam_conv keys);
- mci_io.safetensors: pixels (2,3,96,96); `train.features` and `reparam.features` (B, 12), each the
  model's own output (open_clip's encode_image before normalisation); `train.reparameterized_features`:
  timm's reparameterised training-form model in F32 (what nolad's fold at load must reproduce); per form
  `<form>.tune.*`: the tuned variant's logits, loss and gradients.
Weights and pixels are stored as F16 and the models run in F32 on exactly those values, so the files stay
small (< 300 kB together) without changing what is compared.

The tiny model: layers (1, 1, 1, 2), widths (8, 16, 32, 64), MLP ratios (3, 3, 3, 2), token mixers
repmixer ×3 + attention (head_dim 32: two heads), SE in the last two downsamplings, RepCPE 7×7 before the
attention stage, lkc_use_act (as fastvit_mci0/1/2), final_conv (×2 channels, SE) and head to 12.

The tuned variant (docs/mobileclip.md): the attention stage's BatchNorm affine (norm.weight, norm.bias)
and layer scales (layer_scale_1.gamma, layer_scale_2.gamma) of every block of the last stage, with a
linear head (C, E) on the features; loss = label-smoothing (0.1) cross-entropy, mean over the batch.
"""
import math
import os
from functools import partial

import torch
from safetensors.torch import save_file
from timm.models.fastvit import FastVit, RepConditionalPosEnc
from timm.utils import reparameterize_model

OUT = os.path.join(os.path.dirname(__file__), "..", "Tests", "ModelsTests", "Fixtures")
PREFIX = "visual.trunk."
torch.manual_seed(0)


def tiny():
    return FastVit(
        layers=(1, 1, 1, 2), embed_dims=(8, 16, 32, 64), mlp_ratios=(3, 3, 3, 2),
        se_downsamples=(False, False, True, True),
        pos_embs=(None, None, None, partial(RepConditionalPosEnc, spatial_shape=(7, 7))),
        token_mixers=("repmixer", "repmixer", "repmixer", "attention"),
        lkc_use_act=True, num_classes=12, global_pool="avg").eval()


def randomize(model):
    """Every parameter and BatchNorm statistic random and O(1): layer scales (init 1e-5) and BatchNorm
    (init identity) would otherwise hide whole branches."""
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                p.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                p.normal_(0, 0.3)
            elif name.endswith("gamma"):
                p.uniform_(0.2, 0.8)
            elif p.ndim >= 2:
                p.normal_(0, 1 / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):  # BatchNorm weight
                p.normal_(1, 0.2)
            else:
                p.normal_(0, 0.2)


def f16_exact(model):
    """Rounds every parameter and buffer to F16 (kept in F32), so the F16 file holds the model exactly."""
    with torch.no_grad():
        for _, p in list(model.named_parameters()) + list(model.named_buffers()):
            if p.is_floating_point():
                p.copy_(p.half().float())


def save_state(model, name):
    state = {PREFIX + k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(OUT, name))


TRAINED = ["norm.weight", "norm.bias", "layer_scale_1.gamma", "layer_scale_2.gamma"]


def tune_gradients(model, pixels, io, form):
    """The tuned variant's logits, loss and gradients (`<form>.tune.*`; the trained tensors have the same names
    in both forms)."""
    head = io["tune.head"].clone().requires_grad_(True)
    labels = io["tune.labels"].long()
    trained = {}
    for i, block in enumerate(model.stages[3].blocks):
        for key in TRAINED:
            t = block.get_parameter(key)
            t.requires_grad_(True)
            trained[f"{PREFIX}stages.3.blocks.{i}.{key}"] = t
    logits = model(pixels) @ head.T
    loss = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    grads = torch.autograd.grad(loss, [head] + list(trained.values()))
    io[form + ".tune.logits"] = logits.detach()
    io[form + ".tune.loss"] = loss.detach().reshape(1)
    io[form + ".tune.grad.head.weight"] = grads[0]
    for (name, _), g in zip(trained.items(), grads[1:]):
        io[form + ".tune.grad." + name] = g.reshape(-1)
    for t in trained.values():
        t.requires_grad_(False)
    print(form, "loss", loss.item(), "grad scales", [round(g.abs().max().item(), 5) for g in grads])


def main():
    model = tiny()
    randomize(model)
    f16_exact(model)
    pixels = torch.randn(2, 3, 96, 96).half().float()
    io = {"pixel_values": pixels.half()}
    with torch.no_grad():
        io["train.features"] = model(pixels)
    save_state(model, "mci-train.safetensors")

    classes = 5
    io["tune.labels"] = torch.tensor([3, 1]).float()
    io["tune.head"] = (torch.randn(classes, 12) * 0.3).half().float()
    tune_gradients(model, pixels, io, "train")

    reparam = reparameterize_model(model)
    with torch.no_grad():  # timm's own fold of these very weights, before the F16 rounding below
        io["train.reparameterized_features"] = reparam(pixels)
    f16_exact(reparam)
    with torch.no_grad():
        io["reparam.features"] = reparam(pixels)
    save_state(reparam, "mci-reparam.safetensors")
    tune_gradients(reparam, pixels, io, "reparam")
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(OUT, "mci_io.safetensors"))
    diff = (io["train.features"] - io["reparam.features"]).abs().max().item()
    print("features scale", io["train.features"].abs().max().item(), "train vs reparam (F16-rounded)", diff)


if __name__ == "__main__":
    main()
