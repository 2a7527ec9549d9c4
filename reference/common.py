"""Pieces shared by the reference scripts (reference/ and world/): run with the reference environment."""


def byte_alphabet():
    """CLIP's byte-level BPE alphabet: byte -> character. Printable Latin-1 bytes stand for themselves; the
    other 68 bytes get the code points 256, 257, ... in byte order. Insertion order (printable bytes first)
    is the order of the first 256 vocabulary entries."""
    printable = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def clip_image_embeds(clip, x, prompts=None):
    """Projected CLIP image embedding (unnormalised) of a transformers CLIPModel; prompts (1, P, width)
    are inserted after CLS, after pre_layrnorm — NoLA's prompt-tuning hook."""
    import torch

    vm = clip.vision_model
    h = vm.pre_layrnorm(vm.embeddings(x))
    if prompts is not None:
        h = torch.cat([h[:, :1], prompts.expand(h.shape[0], -1, -1), h[:, 1:]], dim=1)
    h = vm.encoder(inputs_embeds=h).last_hidden_state
    return clip.visual_projection(vm.post_layernorm(h[:, 0]))


class PillowGaussianBlur:
    """The public NoLA code's blur: Pillow's ImageFilter.GaussianBlur with a radius drawn uniformly from
    [low, high] for every image (torch's generator, so a seeded run repeats). nolad's strong view does the
    same (Sources/Imaging/StrongView.swift); torchvision's GaussianBlur(kernel_size=23) is a different filter."""

    def __init__(self, low=0.1, high=2.0):
        self.low, self.high = low, high

    def __call__(self, img):
        import torch
        from PIL import ImageFilter
        radius = float(torch.empty(1).uniform_(self.low, self.high))
        return img.filter(ImageFilter.GaussianBlur(radius=radius))
