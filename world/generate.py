"""A seeded generator of the nolad demo world.

Every image is 224x224 RGB: one main object of a class (its kind of shape) drawn
procedurally with a random colour, fill texture, size, position and rotation, on
a random background (solid, gradient, stripes, checks, dots, noise), with small
clutter, optional occlusion, blur and pixel noise. Each image has a plain-English
caption that names some of its attributes; about one caption in ten does not
name the shape at all and some use another word for it (donut, plus sign, coil...).

    generate_image(rng, cls) -> (PIL.Image, caption)
    python world/generate.py cache OUT.npy N SEED     # training cache (uint8 N x 224 x 224 x 3 + captions .json)
    python world/generate.py collection DIR N SEED    # demo collection DIR/<class>/NNN.jpg
"""

import json
import math
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 224
CLASSES = ["star", "ring", "arrow", "cross", "heart", "crescent", "triangle", "spiral"]

# Other words a caption may use for a class (the zero-shot classifier only knows the class name
# and the descriptions, so synonyms make captions and class names disagree now and then).
SYNONYMS = {
    "star": ["star", "star", "star", "five-pointed star", "star shape"],
    "ring": ["ring", "ring", "ring", "donut", "hoop", "circle outline"],
    "arrow": ["arrow", "arrow", "arrow", "pointer", "arrow sign"],
    "cross": ["cross", "cross", "cross", "plus sign", "plus"],
    "heart": ["heart", "heart", "heart", "heart shape", "love heart"],
    "crescent": ["crescent", "crescent", "crescent", "moon shape", "crescent moon"],
    "triangle": ["triangle", "triangle", "triangle", "wedge", "three-sided shape"],
    "spiral": ["spiral", "spiral", "spiral", "swirl", "coil"],
}

COLOURS = {
    "red": (210, 40, 40), "orange": (240, 140, 30), "yellow": (235, 215, 40),
    "green": (50, 160, 60), "blue": (40, 80, 200), "purple": (130, 50, 170),
    "pink": (240, 130, 180), "brown": (120, 75, 40), "black": (25, 25, 25),
    "white": (240, 240, 240), "grey": (130, 130, 130), "teal": (30, 150, 150),
}
COLOUR_NAMES = list(COLOURS)
BACKGROUNDS = ["plain", "gradient", "striped", "checked", "dotted", "noisy"]
FILLS = ["solid", "solid", "solid", "striped", "dotted", "two-tone"]


def jitter_colour(rng, rgb, amount=30):
    c = np.array(rgb, dtype=np.float32) + rng.uniform(-amount, amount, 3)
    return np.clip(c, 0, 255)


def texture(rng, kind, c1, c2):
    """A SIZE x SIZE x 3 float32 pattern of two colours."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    if kind in ("plain", "solid"):
        t = np.zeros((SIZE, SIZE), np.float32)
    elif kind == "gradient" or kind == "two-tone":
        a = rng.uniform(0, 2 * math.pi)
        p = (xx - SIZE / 2) * math.cos(a) + (yy - SIZE / 2) * math.sin(a)
        t = (p - p.min()) / (p.max() - p.min() + 1e-6)
        if kind == "two-tone":
            t = (t > 0.5).astype(np.float32)
    elif kind == "striped":
        a = rng.uniform(0, math.pi)
        period = rng.uniform(8, 28)
        p = xx * math.cos(a) + yy * math.sin(a)
        t = ((p / period) % 1.0 < 0.5).astype(np.float32)
    elif kind == "checked":
        period = rng.uniform(12, 40)
        t = (((xx // period) + (yy // period)) % 2).astype(np.float32)
    elif kind == "dotted":
        period = rng.uniform(10, 24)
        r = period * rng.uniform(0.2, 0.35)
        dx = (xx % period) - period / 2
        dy = (yy % period) - period / 2
        t = ((dx * dx + dy * dy) < r * r).astype(np.float32)
    elif kind == "noisy":
        small = rng.uniform(0, 1, (SIZE // 8, SIZE // 8)).astype(np.float32)
        t = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR),
                       dtype=np.float32) / 255.0
    else:
        raise ValueError(kind)
    return c1[None, None, :] * (1 - t[..., None]) + c2[None, None, :] * t[..., None]


def rot(points, angle, cx, cy):
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in points]


def shape_mask(rng, cls, cx, cy, r, angle):
    """A SIZE x SIZE float32 mask (0/1) of the object of class cls, radius about r."""
    m = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(m)
    if cls == "star":
        n = 5 if rng.random() < 0.8 else 6
        inner = rng.uniform(0.38, 0.5)
        pts = []
        for i in range(2 * n):
            rr = r if i % 2 == 0 else r * inner
            a = -math.pi / 2 + i * math.pi / n
            pts.append((rr * math.cos(a), rr * math.sin(a)))
        d.polygon(rot(pts, angle, cx, cy), fill=255)
    elif cls == "ring":
        inner = r * rng.uniform(0.5, 0.72)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        d.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif cls == "arrow":
        w = r * rng.uniform(0.18, 0.3)
        hw = r * rng.uniform(0.5, 0.7)
        hl = r * rng.uniform(0.6, 0.9)
        pts = [(-r, -w), (r - hl, -w), (r - hl, -hw), (r, 0), (r - hl, hw), (r - hl, w), (-r, w)]
        d.polygon(rot(pts, angle, cx, cy), fill=255)
    elif cls == "cross":
        w = r * rng.uniform(0.25, 0.38)
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w),
               (-w, -w)]
        d.polygon(rot(pts, angle, cx, cy), fill=255)
    elif cls == "heart":
        pts = []
        for i in range(64):
            t = 2 * math.pi * i / 64
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((x * r / 17, y * r / 17))
        d.polygon(rot(pts, angle * 0.4, cx, cy), fill=255)  # hearts stay roughly upright
    elif cls == "crescent":
        off = r * rng.uniform(0.35, 0.6)
        r2 = r * rng.uniform(0.8, 0.95)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ox, oy = cx + off * math.cos(angle), cy + off * math.sin(angle)
        d.ellipse([ox - r2, oy - r2, ox + r2, oy + r2], fill=0)
    elif cls == "triangle":
        pts = [(r * math.cos(-math.pi / 2 + k * 2 * math.pi / 3), r * math.sin(-math.pi / 2 + k * 2 * math.pi / 3))
               for k in range(3)]
        pts = [(x * rng.uniform(0.8, 1.2), y) for x, y in pts]
        d.polygon(rot(pts, angle, cx, cy), fill=255)
    elif cls == "spiral":
        turns = rng.uniform(2.0, 3.2)
        width = max(3, int(r * rng.uniform(0.1, 0.16)))
        pts = []
        steps = 90
        for i in range(steps + 1):
            t = i / steps
            a = angle + t * turns * 2 * math.pi
            rr = r * (0.08 + 0.92 * t)
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        d.line(pts, fill=255, width=width, joint="curve")
    else:
        raise ValueError(cls)
    return np.asarray(m, dtype=np.float32) / 255.0


def clutter_mask(rng):
    """Small distractors that belong to no class: dots, short strokes, small squares, squiggles."""
    m = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(m)
    kind = rng.integers(4)
    x, y = rng.uniform(0, SIZE, 2)
    s = rng.uniform(4, 14)
    if kind == 0:
        d.ellipse([x - s, y - s, x + s, y + s], fill=255)
    elif kind == 1:
        a = rng.uniform(0, math.pi)
        l = rng.uniform(15, 40)
        d.line([(x, y), (x + l * math.cos(a), y + l * math.sin(a))], fill=255, width=int(rng.integers(2, 5)))
    elif kind == 2:
        d.rectangle([x - s, y - s, x + s, y + s * rng.uniform(0.5, 1.5)], fill=255)
    else:
        pts = [(x + 6 * i, y + 6 * math.sin(i * 1.3)) for i in range(int(rng.integers(4, 8)))]
        d.line(pts, fill=255, width=2)
    return np.asarray(m, dtype=np.float32) / 255.0


def size_word(r):
    return "small" if r < 60 else ("large" if r > 85 else None)


def position_word(cx, cy):
    h = "left" if cx < 85 else ("right" if cx > 139 else None)
    v = "top" if cy < 85 else ("bottom" if cy > 139 else None)
    if h and v:
        return f"{v} {h}"
    if h or v:
        return h or v
    return "centre"


def generate_image(rng, cls):
    """One image of class cls and its caption. rng: numpy Generator."""
    # background
    bg_kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    bg_name = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
    bg2 = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
    c_bg = jitter_colour(rng, COLOURS[bg_name])
    c_bg2 = c_bg + 0.35 * (jitter_colour(rng, COLOURS[bg2]) - c_bg)  # background patterns are low-contrast
    img = texture(rng, bg_kind, c_bg, c_bg2)

    # clutter behind the object
    for _ in range(rng.integers(0, 4)):
        c = jitter_colour(rng, COLOURS[COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]], 40)
        m = clutter_mask(rng)[..., None]
        img = img * (1 - m) + c * m

    # the object
    r = rng.uniform(48, 100)
    margin = r * 0.7
    cx = rng.uniform(margin, SIZE - margin)
    cy = rng.uniform(margin, SIZE - margin)
    angle = rng.uniform(0, 2 * math.pi)
    col_name = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
    while col_name == bg_name:
        col_name = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
    fill = FILLS[rng.integers(len(FILLS))]
    c2_name = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
    obj = texture(rng, fill, jitter_colour(rng, COLOURS[col_name]), jitter_colour(rng, COLOURS[c2_name]))
    m = shape_mask(rng, cls, cx, cy, r, angle)
    if rng.random() < 0.3:  # a dark or light outline
        edge = np.asarray(Image.fromarray((m * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(5)),
                          dtype=np.float32)[..., None] / 255.0
        oc = np.array([20, 20, 20] if rng.random() < 0.5 else [235, 235, 235], np.float32)
        img = img * (1 - edge) + oc * edge
    m3 = m[..., None]
    img = img * (1 - m3) + obj * m3

    # occlusion: a bar or a blob over part of the object
    occluded = False
    if rng.random() < 0.3:
        occluded = True
        oc = jitter_colour(rng, COLOURS[COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]], 40)
        om = Image.new("L", (SIZE, SIZE), 0)
        d = ImageDraw.Draw(om)
        ox = cx + rng.uniform(-r, r)
        oy = cy + rng.uniform(-r, r)
        s = r * rng.uniform(0.25, 0.5)
        if rng.random() < 0.5:
            d.rectangle([ox - s, oy - s * 0.4, ox + s, oy + s * 0.4], fill=255)
        else:
            d.ellipse([ox - s, oy - s, ox + s, oy + s], fill=255)
        om = np.asarray(om, dtype=np.float32)[..., None] / 255.0
        img = img * (1 - om) + oc * om

    # pixel noise and blur
    sigma = rng.choice([0, 0, 4, 8, 16])
    if sigma:
        img = img + rng.normal(0, sigma, img.shape)
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if rng.random() < 0.25:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.8)))

    return out, caption(rng, cls, col_name, fill, bg_name, bg_kind, r, cx, cy, occluded)


def caption(rng, cls, col, fill, bg, bg_kind, r, cx, cy, occluded):
    noun = SYNONYMS[cls][rng.integers(len(SYNONYMS[cls]))]
    if rng.random() < 0.1:  # the shape goes unnamed
        noun = ["shape", "object", "thing", "figure"][rng.integers(4)]
    adj = []
    if rng.random() < 0.4:
        adj.append(col)
    sw = size_word(r)
    if sw and rng.random() < 0.5:
        adj.insert(0, sw)
    if fill != "solid" and rng.random() < 0.4:
        adj.append(fill)
    head = " ".join(adj + [noun])
    article = "an" if head[0] in "aeiou" else "a"
    parts = [f"{article} {head}"]
    if rng.random() < 0.3:
        bgw = bg if bg_kind in ("plain", "gradient") or rng.random() < 0.5 else f"{bg_kind} {bg}"
        if rng.random() < 0.3:
            bgw = bg_kind if bg_kind != "plain" else bg
        parts.append(f"on a {bgw} background")
    if rng.random() < 0.25:
        pw = position_word(cx, cy)
        parts.append("in the centre" if pw == "centre" else f"in the {pw}")
    if occluded and rng.random() < 0.4:
        parts.append("partly hidden")
    text = " ".join(parts)
    style = rng.random()
    if style < 0.2:
        text = "a photo of " + text
    elif style < 0.3:
        text = "a drawing of " + text
    elif style < 0.35:
        text = "there is " + text
    return text + "."


def make_cache(path, n, seed, classes=None, generate=None):
    """classes / generate: another world's CLASSES and generate_image (default: this world's)."""
    classes, generate = classes or CLASSES, generate or generate_image
    rng = np.random.default_rng(seed)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, SIZE, SIZE, 3))
    caps, labels = [], []
    for i in range(n):
        cls = classes[i % len(classes)]
        im, cap = generate(rng, cls)
        arr[i] = np.asarray(im)
        caps.append(cap)
        labels.append(i % len(classes))
        if i % 2000 == 0:
            print(i, cap, flush=True)
    arr.flush()
    with open(path.replace(".npy", ".json"), "w") as f:
        json.dump({"captions": caps, "labels": labels, "classes": classes, "seed": seed}, f)


def make_collection(root, per_class, seed, classes=None, generate=None):
    classes, generate = classes or CLASSES, generate or generate_image
    rng = np.random.default_rng(seed)
    for cls in classes:
        os.makedirs(os.path.join(root, cls), exist_ok=True)
    for i in range(per_class):
        for cls in classes:
            im, _ = generate(rng, cls)
            im.save(os.path.join(root, cls, f"{i:03d}.jpg"), quality=85)


if __name__ == "__main__":
    if sys.argv[1] == "cache":
        make_cache(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1] == "collection":
        make_collection(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit("usage: generate.py cache OUT.npy N SEED | collection DIR PER_CLASS SEED")
