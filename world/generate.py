"""A seeded generator of the nolad demo world: colour themes.

Every image is 224x224 RGB: one main object drawn procedurally on a background. The class is the
image's colour theme: the object's one or two colours and most backgrounds come from the theme's
palette of four named shades. The eight themes are four pairs that share their basic colour words and
differ in lightness (sunset / autumn: red and orange, spring / forest: green and yellow, ocean / night:
blue and purple, desert / earth: brown and grey). Nuisance attributes: the object's outline (disc,
square, star, heart, ...), fill (solid or one of eight patterns), size, position, rotation; the
background (plain, gradient, smooth noise, faint pattern; 10 % in a shade of any theme), clutter,
occlusion (any colour), exposure, pixel noise and blur. Each image has a plain-English caption that
names some attributes with basic colour words ("a red and orange star on an orange background"), adds
"dark" or "light" to a colour word once in twenty-five and never names the theme: the captions, and so
the tiny CLIP trained on them, tell the pairs apart easily and the two themes of a pair hardly at all,
while the pixels separate all eight.

    generate_image(rng, cls) -> (PIL.Image, caption)
    python world/generate.py cache OUT.npy N SEED[,SEED...]  # training cache (uint8 N x 224 x 224 x 3 + captions .json)
    python world/generate.py collection DIR N SEED    # demo collection DIR/<class>/NNN.jpg
"""

import json
import math
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 224
# Classes are colour themes: which shades an image is painted in. Four pairs of themes share their
# basic colour words and differ in lightness; each theme has four shades, two per word. Captions use
# the basic words, with "dark" or "light" once in twenty-five (MODIFIER_P), and never the theme's name.
CLASSES = ["sunset", "autumn", "spring", "forest", "ocean", "night", "desert", "earth"]
PALETTES = {
    "sunset": ["scarlet", "coral", "tangerine", "amber"],
    "autumn": ["maroon", "brick", "rust", "bronze"],
    "spring": ["lime", "mint", "butter", "primrose"],
    "forest": ["pine", "moss", "olive", "mustard"],
    "ocean": ["royal", "azure", "violet", "lilac"],
    "night": ["navy", "indigo", "plum", "aubergine"],
    "desert": ["tan", "sand", "silver", "ash"],
    "earth": ["chocolate", "umber", "charcoal", "slate"],
}
MODIFIER_P, OFF_THEME_BG_P = 0.04, 0.1
SHAPES = ["disc", "square", "star", "heart", "triangle", "hexagon", "ellipse", "crescent"]
PATTERNS = ["stripes", "dots", "checks", "grid", "waves", "zigzag", "rings", "bricks"]
FILLS = ["solid", "solid", "solid"] + PATTERNS
PATTERN_ADJ = {
    "stripes": "striped", "dots": "dotted", "checks": "checked", "grid": "gridded",
    "waves": "wavy", "zigzag": "zigzag", "rings": "ringed", "bricks": "brick",
}

# shade: (RGB, basic colour word, modifier a caption may add)
SHADES = {
    "scarlet": ((225, 35, 45), "red", None), "coral": ((245, 95, 70), "red", "light"),
    "tangerine": ((250, 145, 30), "orange", None), "amber": ((250, 180, 40), "orange", "light"),
    "maroon": ((115, 20, 30), "red", "dark"), "brick": ((150, 40, 35), "red", "dark"),
    "rust": ((150, 70, 20), "orange", "dark"), "bronze": ((160, 95, 20), "orange", "dark"),
    "lime": ((165, 225, 80), "green", "light"), "mint": ((170, 240, 190), "green", "light"),
    "butter": ((245, 240, 150), "yellow", "light"), "primrose": ((235, 235, 120), "yellow", "light"),
    "pine": ((20, 85, 40), "green", "dark"), "moss": ((60, 100, 40), "green", "dark"),
    "olive": ((105, 100, 20), "yellow", "dark"), "mustard": ((120, 125, 25), "yellow", "dark"),
    "royal": ((40, 95, 215), "blue", None), "azure": ((60, 150, 235), "blue", "light"),
    "violet": ((150, 90, 225), "purple", None), "lilac": ((185, 140, 235), "purple", "light"),
    "navy": ((20, 25, 85), "blue", "dark"), "indigo": ((35, 30, 110), "blue", "dark"),
    "plum": ((70, 20, 80), "purple", "dark"), "aubergine": ((55, 25, 60), "purple", "dark"),
    "tan": ((205, 165, 115), "brown", "light"), "sand": ((225, 200, 150), "brown", "light"),
    "silver": ((195, 195, 200), "grey", "light"), "ash": ((170, 170, 165), "grey", "light"),
    "chocolate": ((85, 50, 25), "brown", "dark"), "umber": ((95, 60, 45), "brown", "dark"),
    "charcoal": ((70, 72, 72), "grey", "dark"), "slate": ((85, 90, 95), "grey", "dark"),
}
COLOURS = {name: rgb for name, (rgb, _, _) in SHADES.items()}
COLOUR_NAMES = list(COLOURS)
BACKGROUNDS = ["plain", "plain", "gradient", "gradient", "noisy", "patterned"]


def colour_word(rng, shade):
    """The words a caption uses for a shade: its basic colour, with its modifier (dark, light) now and then."""
    _, basic, modifier = SHADES[shade]
    return f"{modifier} {basic}" if modifier and rng.random() < MODIFIER_P else basic


def jitter_colour(rng, rgb, amount=20):
    c = np.array(rgb, dtype=np.float32) + rng.uniform(-amount, amount, 3)
    return np.clip(c, 0, 255)


def frac(x):
    return x - np.floor(x)


def pattern(rng, kind, cx, cy):
    """A SIZE x SIZE float32 map in [0, 1] of pattern `kind` (one of PATTERNS): random period, angle,
    phase and line width."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    a = rng.uniform(0, 2 * math.pi)
    u = (xx - cx) * math.cos(a) + (yy - cy) * math.sin(a) + rng.uniform(0, 100)
    v = -(xx - cx) * math.sin(a) + (yy - cy) * math.cos(a) + rng.uniform(0, 100)
    p = rng.uniform(14, 30)  # period in pixels
    if kind == "stripes":
        t = frac(u / p) < rng.uniform(0.35, 0.6)
    elif kind == "waves":
        amp, lam = p * rng.uniform(0.35, 0.8), p * rng.uniform(2.0, 3.5)
        t = frac((u + amp * np.sin(2 * math.pi * v / lam)) / p) < rng.uniform(0.35, 0.6)
    elif kind == "zigzag":
        amp, lam = p * rng.uniform(0.35, 0.8), p * rng.uniform(1.5, 3.0)
        tri = 2 * np.abs(2 * frac(v / lam) - 1) - 1
        t = frac((u + amp * tri) / p) < rng.uniform(0.35, 0.6)
    elif kind == "checks":
        t = (np.floor(u / p) + np.floor(v / p)) % 2 == 1
    elif kind == "grid":
        w = rng.uniform(0.12, 0.25)
        t = (frac(u / p) < w) | (frac(v / p) < w)
    elif kind == "dots":
        shift = 0.5 * np.floor(v / p) if rng.random() < 0.5 else 0.0  # square or staggered rows
        du, dv = frac(u / p + shift) - 0.5, frac(v / p) - 0.5
        t = du * du + dv * dv < rng.uniform(0.2, 0.34) ** 2
    elif kind == "rings":
        ox, oy = cx + rng.uniform(-30, 30), cy + rng.uniform(-30, 30)
        t = frac(np.hypot(xx - ox, yy - oy) / p + rng.uniform()) < rng.uniform(0.35, 0.6)
    elif kind == "bricks":
        h, w = p * rng.uniform(0.7, 1.0), rng.uniform(0.1, 0.2)
        bw = h * rng.uniform(1.8, 2.8)
        row = np.floor(v / h)
        t = (frac(v / h) < w) | (frac((u + 0.5 * bw * (row % 2)) / bw) < w * h / bw)
    else:
        raise ValueError(kind)
    return t.astype(np.float32)


def smooth_noise(rng):
    small = rng.uniform(0, 1, (SIZE // 8, SIZE // 8)).astype(np.float32)
    return np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR),
                      dtype=np.float32) / 255.0


def mix(t, c1, c2):
    return c1[None, None, :] * (1 - t[..., None]) + c2[None, None, :] * t[..., None]


def rot(points, angle, cx, cy):
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in points]


def regular(n, r, start=-math.pi / 2):
    return [(r * math.cos(start + k * 2 * math.pi / n), r * math.sin(start + k * 2 * math.pi / n)) for k in range(n)]


def shape_mask(rng, shape, cx, cy, r, angle):
    """A SIZE x SIZE float32 mask (0/1) of an outline `shape` (one of SHAPES), radius about r."""
    m = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(m)
    if shape == "disc":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ellipse":
        e = rng.uniform(0.55, 0.8)
        pts = [(r * math.cos(t), e * r * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 64, endpoint=False)]
        d.polygon(rot(pts, angle, cx, cy), fill=255)
    elif shape == "square":
        d.polygon(rot(regular(4, r * 1.05, math.pi / 4), angle, cx, cy), fill=255)
    elif shape == "hexagon":
        d.polygon(rot(regular(6, r), angle, cx, cy), fill=255)
    elif shape == "triangle":
        pts = [(x * rng.uniform(0.85, 1.15), y) for x, y in regular(3, r * 1.15)]
        d.polygon(rot(pts, angle, cx, cy), fill=255)
    elif shape == "star":
        n, inner = (5 if rng.random() < 0.8 else 6), rng.uniform(0.45, 0.6)
        pts = [((r if i % 2 == 0 else r * inner) * math.cos(-math.pi / 2 + i * math.pi / n),
                (r if i % 2 == 0 else r * inner) * math.sin(-math.pi / 2 + i * math.pi / n)) for i in range(2 * n)]
        d.polygon(rot(pts, angle, cx, cy), fill=255)
    elif shape == "heart":
        pts = []
        for i in range(64):
            t = 2 * math.pi * i / 64
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((x * r / 16, y * r / 16))
        d.polygon(rot(pts, angle * 0.4, cx, cy), fill=255)  # hearts stay roughly upright
    elif shape == "crescent":
        off, r2 = r * rng.uniform(0.3, 0.45), r * rng.uniform(0.7, 0.85)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ox, oy = cx + off * math.cos(angle), cy + off * math.sin(angle)
        d.ellipse([ox - r2, oy - r2, ox + r2, oy + r2], fill=0)
    else:
        raise ValueError(shape)
    return np.asarray(m, dtype=np.float32) / 255.0


def clutter_mask(rng):
    """Small distractors that belong to no class: dots, short strokes, small squares, squiggles."""
    m = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(m)
    kind = rng.integers(4)
    x, y = rng.uniform(0, SIZE, 2)
    s = rng.uniform(4, 12)
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
    return "small" if r < 72 else ("large" if r > 95 else None)


def position_word(cx, cy):
    h = "left" if cx < 95 else ("right" if cx > 129 else None)
    v = "top" if cy < 95 else ("bottom" if cy > 129 else None)
    if h and v:
        return f"{v} {h}"
    if h or v:
        return h or v
    return "centre"


def pick(rng, items):
    return items[rng.integers(len(items))]


def generate_image(rng, cls):
    """One image of colour theme cls and its caption. rng: numpy Generator."""
    palette = PALETTES[cls]
    bg_kind = pick(rng, BACKGROUNDS)
    bg_name = pick(rng, palette) if rng.random() >= OFF_THEME_BG_P else pick(rng, COLOUR_NAMES)  # off-theme now and then
    bg2 = pick(rng, palette)
    c_bg = jitter_colour(rng, COLOURS[bg_name])
    c_bg2 = jitter_colour(rng, COLOURS[bg2])
    if bg_kind == "plain":
        img = mix(np.zeros((SIZE, SIZE), np.float32), c_bg, c_bg)
    elif bg_kind == "gradient":
        ga = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
        g = (xx - SIZE / 2) * math.cos(ga) + (yy - SIZE / 2) * math.sin(ga)
        img = mix((g - g.min()) / (g.max() - g.min() + 1e-6), c_bg, c_bg + 0.6 * (c_bg2 - c_bg))
    elif bg_kind == "noisy":
        img = mix(smooth_noise(rng), c_bg, c_bg + 0.5 * (c_bg2 - c_bg))
    else:  # a faint pattern
        img = mix(pattern(rng, pick(rng, PATTERNS), SIZE / 2, SIZE / 2), c_bg, c_bg + 0.25 * (c_bg2 - c_bg))

    for _ in range(rng.integers(0, 4)):  # clutter behind the object, in the theme's colours or any
        m = clutter_mask(rng)[..., None]
        cc = pick(rng, palette) if rng.random() < 0.6 else pick(rng, COLOUR_NAMES)
        img = img * (1 - m) + jitter_colour(rng, COLOURS[cc], 40) * m

    # the object: an outline of any shape, solid or patterned, in one or two of the theme's colours
    shape = pick(rng, SHAPES)
    r = rng.uniform(55, 100)
    margin = r * 0.75
    cx, cy = rng.uniform(margin, SIZE - margin), rng.uniform(margin, SIZE - margin)
    angle = rng.uniform(0, 2 * math.pi)
    col1 = pick(rng, palette)
    while col1 == bg_name:
        col1 = pick(rng, palette)
    col2 = pick(rng, palette)
    while col2 == col1:
        col2 = pick(rng, palette)
    fill = pick(rng, FILLS)
    c1 = jitter_colour(rng, COLOURS[col1])
    if fill == "solid":
        obj = mix(np.zeros((SIZE, SIZE), np.float32), c1, c1)
        col2 = None
    else:
        c2 = jitter_colour(rng, COLOURS[col2])
        obj = mix(pattern(rng, fill, cx, cy), c1, c2 + rng.uniform(0, 0.3) * (c1 - c2))
    m = shape_mask(rng, shape, cx, cy, r, angle)
    if rng.random() < 0.3:  # a dark or light outline
        edge = np.asarray(Image.fromarray((m * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(5)),
                          dtype=np.float32)[..., None] / 255.0
        oc = np.array([20, 20, 20] if rng.random() < 0.5 else [235, 235, 235], np.float32)
        img = img * (1 - edge) + oc * edge
    m3 = m[..., None]
    img = img * (1 - m3) + obj * m3

    occluded = False
    if rng.random() < 0.3:  # a bar or blob of any colour over part of the object
        occluded = True
        oc = jitter_colour(rng, COLOURS[pick(rng, COLOUR_NAMES)], 40)
        om = Image.new("L", (SIZE, SIZE), 0)
        d = ImageDraw.Draw(om)
        ox, oy = cx + rng.uniform(-r, r), cy + rng.uniform(-r, r)
        s = r * rng.uniform(0.25, 0.5)
        if rng.random() < 0.5:
            d.rectangle([ox - s, oy - s * 0.4, ox + s, oy + s * 0.4], fill=255)
        else:
            d.ellipse([ox - s, oy - s, ox + s, oy + s], fill=255)
        om = np.asarray(om, dtype=np.float32)[..., None] / 255.0
        img = img * (1 - om) + oc * om

    img = img * rng.uniform(0.9, 1.1)  # exposure
    sigma = rng.choice([0, 0, 4, 8, 16])  # pixel noise and blur
    if sigma:
        img = img + rng.normal(0, sigma, img.shape)
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if rng.random() < 0.25:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.8)))

    return out, caption(rng, shape, fill, col1, col2, bg_name, r, cx, cy, occluded)


def caption(rng, shape, fill, col1, col2, bg, r, cx, cy, occluded):
    """Plain English naming some attributes: colours (basic words) in most captions, never the theme."""
    noun = shape if rng.random() < 0.8 else pick(rng, ["shape", "object", "thing", "figure"])
    if noun == "disc" and rng.random() < 0.5:
        noun = "circle"
    adj = []
    sw = size_word(r)
    if sw and rng.random() < 0.4:
        adj.append(sw)
    if fill != "solid" and rng.random() < 0.4:
        adj.append(PATTERN_ADJ[fill])
    tail = []
    if rng.random() < 0.7:
        w1 = colour_word(rng, col1)
        w2 = colour_word(rng, col2) if col2 and rng.random() < 0.6 else w1
        adj.append(w1 if w2 == w1 else f"{w1} and {w2}")
    head = " ".join(adj + [noun])
    article = "an" if head[0] in "aeiou" else "a"
    parts = [f"{article} {head}"] + tail
    if rng.random() < 0.5:
        bgw = colour_word(rng, bg)
        parts.append(f"on {'an' if bgw[0] in 'aeiou' else 'a'} {bgw} background")
    if rng.random() < 0.2:
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



def make_cache(path, n, seeds):
    """N images as one uint8 .npy plus a .json of captions, labels and classes: an equal share from each
    seed's stream (seeds: a list of ints), classes in turn within each share."""
    per = n // len(seeds)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(per * len(seeds), SIZE, SIZE, 3))
    caps, labels = [], []
    for s, seed in enumerate(seeds):
        rng = np.random.default_rng(seed)
        for i in range(per):
            im, cap = generate_image(rng, CLASSES[i % len(CLASSES)])
            arr[s * per + i] = np.asarray(im)
            caps.append(cap)
            labels.append(i % len(CLASSES))
            if i % 2000 == 0:
                print(seed, i, cap, flush=True)
    arr.flush()
    with open(path.replace(".npy", ".json"), "w") as f:
        json.dump({"captions": caps, "labels": labels, "classes": CLASSES, "seed": seeds}, f)


def make_collection(root, per_class, seed):
    """root/<class>/NNN.jpg, per_class images of every class (JPEG quality 85)."""
    rng = np.random.default_rng(seed)
    for cls in CLASSES:
        os.makedirs(os.path.join(root, cls), exist_ok=True)
    for i in range(per_class):
        for cls in CLASSES:
            im, _ = generate_image(rng, cls)
            im.save(os.path.join(root, cls, f"{i:03d}.jpg"), quality=85)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "cache":
        make_cache(sys.argv[2], int(sys.argv[3]), [int(v) for v in sys.argv[4].split(",")])
    elif len(sys.argv) == 5 and sys.argv[1] == "collection":
        make_collection(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit("usage: generate.py cache OUT.npy N SEED[,SEED...] | collection DIR PER_CLASS SEED")
