"""Writes the Imaging fixtures: small generated images, Pillow's decoded RGB, the weak-view crops and
normalised tensors (torchvision), each strong-view op's output for fixed parameters, and bad files.

Run with the reference environment (outside the repo):
    "$NOLAD_REFERENCE_PYTHON" reference/make_image_fixtures.py
Output: Tests/ImagingTests/Fixtures/{images,bad,ref,sweep}/ and Tests/ImagingTests/Fixtures/manifest.json.
Raw outputs are uint8 HWC RGB (.rgb) or float32 little-endian CHW (.f32); the shape sweep stores its
reference outputs as lossless RGB PNGs (.png) to stay small.
"""
import io
import json
import os
import struct
import subprocess
import tempfile
import zlib

import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageFilter, ImageOps, features
import torch
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as F

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Tests", "ImagingTests", "Fixtures")
IMAGES = os.path.join(ROOT, "images")
SWEEP = os.path.join(ROOT, "sweep")
BAD = os.path.join(ROOT, "bad")
REF = os.path.join(ROOT, "ref")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TENSOR_CASES = ("rgb_420_baseline.jpg", "cmyk.jpg", "palette_trns.png")


def photo_like(w, h, seed, noise=6):
    """Smooth gradients + blobs + shapes + text-like edges + sensor noise: exercises every DCT band."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for c in range(3):
        a, b = rng.uniform(-1, 1, 2)
        img[..., c] = 128 + 60 * (a * xx / max(w, 1) + b * yy / max(h, 1))
    for _ in range(6):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.05, 0.4) * max(w, h)
        col = rng.uniform(-80, 80, 3)
        img += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None] * col
    img += rng.normal(0, noise, img.shape)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    for _ in range(5):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        x1, y1 = x0 + rng.uniform(2, w / 3 + 2), y0 + rng.uniform(2, h / 3 + 2)
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.uniform() < 0.5:
            d.rectangle([x0, y0, x1, y1], outline=col, width=2)
        else:
            d.ellipse([x0, y0, x1, y1], fill=col)
    for k in range(3):
        d.text((rng.uniform(0, w * 0.7), rng.uniform(0, h * 0.8)), "NoLA 42 Ag", fill=(250, 250, 250) if k % 2 else (5, 5, 5))
    return im


def write_raw(path, arr):
    arr = np.ascontiguousarray(arr)
    with open(path, "wb") as f:
        f.write(arr.tobytes())


def fnv1a64(arr):
    """FNV-1a 64-bit of the bytes, as Tests/ImagingTests/Fixtures.swift computes it."""
    data = np.frombuffer(np.ascontiguousarray(arr).tobytes(), dtype=np.uint8)
    h = 0xCBF29CE484222325
    prime = 0x100000001B3
    for b in data.tobytes():
        h = ((h ^ b) * prime) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def weak_view(im_rgb, resize, crop):
    t = T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(crop)])
    return t(im_rgb)


def normalised(crop_img, mean, std):
    return T.Normalize(mean, std)(T.ToTensor()(crop_img)).numpy().astype("<f4")


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def sweep_png(name, im):
    """A reference output as a lossless PNG under sweep/ (the tests decode it with nolad's PNG decoder,
    which is byte-exact against Pillow on every PNG fixture)."""
    im.save(os.path.join(SWEEP, name), "PNG", optimize=True)
    return "sweep/" + name


def pillow_horizontal_first(w, h, ow, oh):
    """Pillow 13's pass order (libImaging/Resample.c ImagingResampleInner): vertical pass first when the
    height shrinks by more than twice as many pixels as the width. Recorded so the sweep provably covers both."""
    return not ((h - oh) > 0 and (h - oh) > (w - ow) * 2)


def shape_sweep():
    """Weak views (Resize(n, BICUBIC) + CenterCrop) of generated files in many shapes, Pillow resizes of crops
    of one photo to many sizes, and RandomResizedCrop's resized_crop on many boxes: every shape class the
    issue lists (tall, wide, odd, smaller than the crop, exactly the crop, over 1000 px, 1:20, 1xN)."""
    sweep = {"views": [], "resizes": [], "resized_crops": []}
    # (file, width, height, format, mode, [(resize, crop), ...]). Low sensor noise keeps the big files small.
    shapes = [
        ("p_333x1000.jpg", 333, 1000, "progressive", "RGB", [(224, 224), (256, 224)]),
        ("b_1000x333.jpg", 1000, 333, "baseline", "RGB", [(224, 224)]),
        ("b_224x224.jpg", 224, 224, "baseline", "RGB", [(224, 224), (256, 224)]),
        ("b_224x500.jpg", 224, 500, "baseline", "RGB", [(224, 224)]),
        ("p_500x224.jpg", 500, 224, "progressive", "RGB", [(224, 224)]),
        ("b_225x1000.jpg", 225, 1000, "baseline", "RGB", [(224, 224)]),
        ("p_301x299.jpg", 301, 299, "progressive", "RGB", [(224, 224)]),
        ("b_299x301.jpg", 299, 301, "baseline", "RGB", [(224, 224)]),
        ("b_100x2000.jpg", 100, 2000, "baseline", "RGB", [(224, 224), (32, 32)]),
        ("p_2000x100.jpg", 2000, 100, "progressive", "RGB", [(224, 224)]),
        ("b_1500x1100.jpg", 1500, 1100, "baseline", "RGB", [(224, 224), (256, 224)]),
        ("p_1100x1537.jpg", 1100, 1537, "progressive", "RGB", [(224, 224)]),
        ("b_639x641.jpg", 639, 641, "baseline", "RGB", [(224, 224)]),
        ("p_223x225.jpg", 223, 225, "progressive", "RGB", [(224, 224)]),
        ("b_100x150.jpg", 100, 150, "baseline", "RGB", [(224, 224)]),
        ("g_150x457.jpg", 150, 457, "baseline", "L", [(224, 224)]),
        ("c_120x400.jpg", 120, 400, "baseline", "CMYK", [(224, 224)]),
        ("s_7x9.png", 7, 9, "png", "RGB", [(224, 224)]),
        ("s_9x7.png", 9, 7, "png", "RGB", [(224, 224)]),
        ("s_1x500.png", 1, 500, "png", "RGB", [(16, 16)]),
        ("s_500x1.png", 500, 1, "png", "RGB", [(16, 16)]),
        ("s_3x2.png", 3, 2, "png", "RGB", [(224, 224)]),
    ]
    for seed, (name, w, h, fmt, mode, specs) in enumerate(shapes, start=100):
        im = photo_like(w, h, seed, noise=1.5)
        if mode != "RGB":
            im = im.convert(mode)
        path = os.path.join(SWEEP, name)
        if fmt == "png":
            im.save(path, "PNG")
        else:
            im.save(path, "JPEG", quality=80, subsampling=2, progressive=fmt == "progressive")
        with Image.open(path) as im0:
            rgb = im0.convert("RGB")
        for resize, crop in specs:
            ow, oh = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
            v = weak_view(rgb, resize, crop)
            sweep["views"].append({"file": "sweep/" + name, "width": w, "height": h, "mode": mode, "format": fmt,
                                   "resize": resize, "crop": crop, "resized": [ow, oh],
                                   "horizontal_first": pillow_horizontal_first(w, h, ow, oh),
                                   "view": sweep_png(f"{name}.weak_{resize}_{crop}.png", v)})

    # Pillow resizes of crops of one decoded sweep photo: (crop width, crop height) -> [(out width, out height)].
    photo = Image.open(os.path.join(SWEEP, "b_1500x1100.jpg")).convert("RGB")
    pairs = [
        ((333, 750), [(224, 504), (50, 113), (150, 700)]),
        ((750, 333), [(504, 224), (700, 150)]),
        ((37, 740), [(10, 200), (37, 100), (74, 300)]),   # 1:20
        ((740, 37), [(200, 10), (100, 37)]),              # 20:1
        ((1500, 1100), [(224, 164), (13, 700), (700, 13)]),
        ((97, 101), [(224, 224), (13, 11), (97, 50), (50, 101)]),
        ((5, 3), [(1, 1), (224, 131)]),
        ((1, 700), [(1, 50), (3, 224)]),
    ]
    for (cw, ch), outs in pairs:
        src = photo.crop((0, 0, cw, ch))
        for ow, oh in outs:
            for filt, tag in ((Image.BICUBIC, "bicubic"), (Image.BILINEAR, "bilinear")):
                out = src.resize((ow, oh), filt)
                sweep["resizes"].append({"source": "sweep/b_1500x1100.jpg", "crop": [cw, ch], "size": [ow, oh],
                                         "filter": tag, "horizontal_first": pillow_horizontal_first(cw, ch, ow, oh),
                                         "out": sweep_png(f"resize_{cw}x{ch}_{ow}x{oh}_{tag}.png", out)})

    # torchvision's resized_crop (RandomResizedCrop's op: crop, then bilinear resize to size x size).
    boxes = [(0, 0, 750, 333, (64, 224)), (10, 20, 700, 200, (64, 224)), (5, 600, 740, 37, (64,)),
             (100, 40, 60, 61, (64,)), (0, 0, 1100, 1500, (64, 224)), (3, 900, 300, 100, (64,)),
             (1, 1, 223, 225, (64, 224)), (70, 0, 20, 400, (64,))]  # (top, left, height, width, sizes)
    for top, left, bh, bw, sizes in boxes:
        for size in sizes:
            out = F.resized_crop(photo, top, left, bh, bw, [size, size], T.InterpolationMode.BILINEAR)
            sweep["resized_crops"].append({"source": "sweep/b_1500x1100.jpg", "top": top, "left": left,
                                           "height": bh, "width": bw, "size": size,
                                           "horizontal_first": pillow_horizontal_first(bw, bh, size, size),
                                           "out": sweep_png(f"rrc_{top}_{left}_{bh}x{bw}_{size}.png", out)})
    return sweep


def main():
    for d in (IMAGES, BAD, REF, SWEEP):
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(d):
            os.remove(os.path.join(d, f))
    manifest = {
        "pillow": PIL.__version__,
        "pillow_libjpeg_turbo": features.version("libjpeg_turbo"),
        "torchvision": torchvision.__version__,
        "images": [],
        "bad": [],
        "ops": [],
    }

    # ---- images: (file name, writer) ----
    cases = []

    def jpeg(name, im, **kw):
        path = os.path.join(IMAGES, name)
        im.save(path, "JPEG", **kw)
        cases.append(name)

    def png(name, im, **kw):
        path = os.path.join(IMAGES, name)
        im.save(path, "PNG", **kw)
        cases.append(name)

    base = photo_like(320, 240, 1)
    jpeg("rgb_420_baseline.jpg", base, quality=88, subsampling=2)
    jpeg("rgb_444_progressive.jpg", photo_like(257, 193, 2), quality=92, subsampling=0, progressive=True)
    jpeg("rgb_422.jpg", photo_like(199, 301, 3), quality=75, subsampling=1)
    jpeg("rgb_420_progressive_odd.jpg", photo_like(333, 211, 4), quality=80, subsampling=2, progressive=True)
    jpeg("gray.jpg", photo_like(150, 230, 5).convert("L"), quality=85)
    jpeg("cmyk.jpg", photo_like(120, 90, 6).convert("CMYK"), quality=90)
    # YCCK JPEG (Adobe transform 2), written by a small libjpeg program since Pillow cannot.
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "write_ycck")
        subprocess.run(["cc", "-O1", "-o", exe, os.path.join(os.path.dirname(os.path.abspath(__file__)), "write_ycck_jpeg.c"),
                        "-ljpeg"], check=True)
        cmyk_src = photo_like(70, 52, 25).convert("CMYK")
        out = subprocess.run([exe, "70", "52"], input=cmyk_src.tobytes(), capture_output=True, check=True).stdout
        with open(os.path.join(IMAGES, "ycck.jpg"), "wb") as f:
            f.write(out)
        cases.append("ycck.jpg")
    # EXIF orientation 6 (rotate 90 CW to display).
    exif = Image.Exif()
    exif[0x0112] = 6
    jpeg("exif_rot6.jpg", photo_like(200, 120, 7), quality=90, exif=exif.tobytes())
    exif8 = Image.Exif()
    exif8[0x0112] = 3
    jpeg("exif_rot3.jpg", photo_like(90, 70, 8), quality=90, exif=exif8.tobytes())
    jpeg("tall_1x3000.jpg", photo_like(1, 3000, 9), quality=90)
    jpeg("larger_1000x750.jpg", photo_like(1000, 750, 10), quality=85)
    png("rgb_7x5.png", photo_like(7, 5, 11))
    rgba = photo_like(130, 97, 12).convert("RGBA")
    a = np.array(rgba)
    a[..., 3] = np.linspace(0, 255, a.shape[1]).astype(np.uint8)[None, :]
    png("rgba.png", Image.fromarray(a, "RGBA"))
    pal = photo_like(111, 80, 13).convert("P", palette=Image.Palette.ADAPTIVE, colors=37)
    png("palette_trns.png", pal, transparency=3)
    png("palette_4bit.png", photo_like(64, 48, 14).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), bits=4)
    png("gray.png", photo_like(90, 77, 15).convert("L"))
    png("gray_alpha.png", photo_like(50, 60, 16).convert("LA"))
    png("gray_1bit.png", photo_like(40, 33, 17).convert("1"))
    g16 = (np.array(photo_like(70, 50, 18).convert("L")).astype(np.uint16) * 257 // 3).astype(">u2")
    g16[0, :10] = [0, 1, 200, 255, 256, 300, 1000, 65535, 40000, 254]
    png("gray16.png", Image.frombytes("I;16B", (70, 50), g16.tobytes()))
    # 16-bit RGB / RGBA PNGs written by hand (Pillow cannot save them).
    rng = np.random.default_rng(19)
    for name, ctype, ch in (("rgb16.png", 2, 3), ("rgba16.png", 6, 4), ("gray_alpha16.png", 4, 2)):
        w, h = 45, 31
        base8 = np.array(photo_like(w, h, 20 + ch).convert("RGBA"))[..., :ch].astype(np.uint16)
        data16 = (base8 * 256 + rng.integers(0, 256, base8.shape)).astype(">u2")
        raw = b"".join(b"\x00" + data16[y].tobytes() for y in range(h))
        blob = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, ctype, 0, 0, 0))
                + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b""))
        with open(os.path.join(IMAGES, name), "wb") as f:
            f.write(blob)
        cases.append(name)
    # Adam7-interlaced RGB PNG (Pillow cannot write one; passes serialised by hand, filter type 0).
    inter = np.array(photo_like(61, 43, 21))
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    raw = b""
    for x0, y0, dx, dy in passes:
        sub = inter[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\x00" + sub[y].tobytes() for y in range(sub.shape[0]))
    blob = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 61, 43, 8, 2, 0, 0, 1))
            + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b""))
    with open(os.path.join(IMAGES, "interlaced.png"), "wb") as f:
        f.write(blob)
    cases.append("interlaced.png")
    # EXIF orientation in a PNG eXIf chunk.
    exif_png = Image.Exif()
    exif_png[0x0112] = 8
    png("exif_rot8.png", photo_like(33, 21, 23), exif=exif_png.tobytes())
    # The other EXIF orientations on tiny PNGs (2 mirror, 4 flip, 5 transpose, 7 transverse).
    for o in (2, 4, 5, 7):
        e = Image.Exif()
        e[0x0112] = o
        png(f"exif_o{o}.png", photo_like(9, 5, 30 + o), exif=e.tobytes())
    png("rgb_trns.png", photo_like(20, 14, 24), transparency=(10, 20, 30))
    # Wider than libpng's default 1,000,000-pixel user limit (Pillow reads it; so must we).
    wide = np.tile(np.arange(256, dtype=np.uint8), 1_200_000 * 3 // 256 + 1)[: 1_200_000 * 3].reshape(1, 1_200_000, 3)
    png("wide_1200000x1.png", Image.fromarray(wide, "RGB"))
    # A JPEG stored under a .png name: recognised by content.
    with open(os.path.join(IMAGES, "jpeg_named.png"), "wb") as f:
        photo_like(40, 30, 22).save(f, "JPEG", quality=90)
    cases.append("jpeg_named.png")

    for name in cases:
        path = os.path.join(IMAGES, name)
        with Image.open(path) as im0:
            im0.load()
            rgb = im0.convert("RGB")
            exif_rgb = ImageOps.exif_transpose(im0).convert("RGB")
        arr = np.array(rgb)
        entry = {"file": name, "width": rgb.width, "height": rgb.height, "mode": im0.mode,
                 "decoded_fnv1a64": fnv1a64(arr)}
        if arr.size <= 120_000:
            write_raw(os.path.join(REF, name + ".decoded.rgb"), arr)
            entry["decoded"] = "ref/" + name + ".decoded.rgb"
        if exif_rgb.size != rgb.size or not np.array_equal(np.array(exif_rgb), arr):
            write_raw(os.path.join(REF, name + ".exif.rgb"), np.array(exif_rgb))
            entry["exif"] = {"width": exif_rgb.width, "height": exif_rgb.height, "file": "ref/" + name + ".exif.rgb"}
        views = []
        big = name in ("rgb_420_baseline.jpg", "larger_1000x750.jpg", "rgba.png")
        specs = [(64, 64)]
        if name == "wide_1200000x1.png":
            specs = []  # its weak view would be a 76-gigapixel resize
        if name == "tall_1x3000.jpg":
            specs = [(32, 32)]
        if big:
            specs.append((224, 224))
        if name == "larger_1000x750.jpg":
            specs.append((256, 224))
        for resize, crop in specs:
            v = weak_view(rgb, resize, crop)
            vname = f"{name}.weak_{resize}_{crop}.rgb"
            write_raw(os.path.join(REF, vname), np.array(v))
            view = {"resize": resize, "crop": crop, "file": "ref/" + vname}
            if crop == 64 and name in TENSOR_CASES:
                for tag, mean, std in (("clip", CLIP_MEAN, CLIP_STD), ("imagenet", IMAGENET_MEAN, IMAGENET_STD)):
                    tname = f"{name}.weak_{resize}_{crop}.{tag}.f32"
                    write_raw(os.path.join(REF, tname), normalised(v, mean, std))
                    view[tag + "_tensor"] = "ref/" + tname
            views.append(view)
        entry["views"] = views
        manifest["images"].append(entry)

    # ---- bad files ----
    def bad(name, blob, error):
        with open(os.path.join(BAD, name), "wb") as f:
            f.write(blob)
        manifest["bad"].append({"file": name, "error": error})

    jpg_bytes = open(os.path.join(IMAGES, "rgb_420_baseline.jpg"), "rb").read()
    png_bytes = open(os.path.join(IMAGES, "rgb_7x5.png"), "rb").read()
    rgba_bytes = open(os.path.join(IMAGES, "rgba.png"), "rb").read()
    bad("truncated.jpg", jpg_bytes[: len(jpg_bytes) * 6 // 10], "truncated")
    bad("header_only.jpg", jpg_bytes[:300], "truncated")
    bad("zero.jpg", b"", "empty")
    bad("text.jpg", b"this is not an image, just a text file named .jpg\n", "unsupportedFormat")
    bad("bmp_like.png", b"BM" + bytes(100), "unsupportedFormat")
    # SOF0 dimensions patched to 60000 x 60000 (3.6 gigapixels).
    sof = jpg_bytes.index(b"\xff\xc0")
    huge = bytearray(jpg_bytes)
    huge[sof + 5: sof + 9] = struct.pack(">HH", 60000, 60000)
    bad("huge_dims.jpg", bytes(huge), "tooLarge")
    # PNG IHDR patched to 100000 x 100000 with a valid CRC.
    ihdr = bytearray(rgba_bytes[8:33])
    ihdr[8:16] = struct.pack(">II", 100000, 100000)
    ihdr[21:25] = struct.pack(">I", zlib.crc32(bytes(ihdr[4:21])) & 0xFFFFFFFF)
    bad("huge_dims.png", rgba_bytes[:8] + bytes(ihdr) + rgba_bytes[33:], "tooLarge")
    # Corrupt IDAT payload (CRC mismatch) and a truncated PNG.
    corrupt = bytearray(rgba_bytes)
    idat = corrupt.index(b"IDAT")
    for k in range(idat + 20, idat + 60):
        corrupt[k] ^= 0x5A
    bad("corrupt_idat.png", bytes(corrupt), "corrupt")
    bad("truncated.png", rgba_bytes[: len(rgba_bytes) // 2], "truncated")
    # JPEG with garbage in place of the Huffman tables' marker segment → libjpeg error.
    garbage = bytearray(jpg_bytes)
    dht = garbage.index(b"\xff\xc4")
    garbage[dht + 4: dht + 40] = bytes([0xFF]) * 36
    bad("corrupt_tables.jpg", bytes(garbage), "corrupt")
    manifest["bad"].append({"file": "missing.jpg", "error": "notFound"})

    # ---- strong-view ops on a small RGB image ----
    src_name = "rgb_420_baseline.jpg"
    src = Image.open(os.path.join(IMAGES, src_name)).convert("RGB").resize((96, 80), Image.BICUBIC)
    write_raw(os.path.join(REF, "op_source.rgb"), np.array(src))
    manifest["op_source"] = {"file": "ref/op_source.rgb", "width": 96, "height": 80}

    def op(name, out, params):
        write_raw(os.path.join(REF, f"op_{name}.rgb"), np.array(out))
        manifest["ops"].append({"name": name, "file": f"ref/op_{name}.rgb", "width": out.width,
                                "height": out.height, "params": params})

    op("resized_crop", F.resized_crop(src, 7, 11, 50, 61, [64, 64], T.InterpolationMode.BILINEAR),
       {"top": 7, "left": 11, "height": 50, "width": 61, "size": 64})
    op("resized_crop_up", F.resized_crop(src, 3, 5, 20, 17, [48, 48], T.InterpolationMode.BILINEAR),
       {"top": 3, "left": 5, "height": 20, "width": 17, "size": 48})
    op("hflip", F.hflip(src), {})
    for f in (0.63, 1.37):
        op(f"brightness_{f}", F.adjust_brightness(src, f), {"factor": f})
        op(f"contrast_{f}", F.adjust_contrast(src, f), {"factor": f})
        op(f"saturation_{f}", F.adjust_saturation(src, f), {"factor": f})
    for hf in (-0.09, 0.04, 0.1):
        op(f"hue_{hf}", F.adjust_hue(src, hf), {"factor": hf})
    start = [[0, 0], [95, 0], [95, 79], [0, 79]]
    end = [[5, 3], [90, 7], [93, 74], [2, 78]]
    coeffs = F._get_perspective_coeffs(start, end)
    op("perspective", F.perspective(src, start, end, T.InterpolationMode.BICUBIC, fill=0),
       {"start": start, "end": end, "coeffs": coeffs})
    for r in (0.1, 0.7, 1.93):
        op(f"blur_{r}", src.filter(ImageFilter.GaussianBlur(radius=r)), {"radius": r})
    # A whole strong view with fixed parameters, composed as NoLA's pipeline applies them.
    sv = {"crop": [5, 7, 60, 70], "size": 48, "flip": True,
          "jitter": {"order": [2, 0, 3, 1], "b": 1.21, "c": 0.74, "s": 1.33, "h": -0.06},
          "start": [[0, 0], [47, 0], [47, 47], [0, 47]], "end": [[3, 1], [45, 4], [47, 44], [1, 46]],
          "jitter2": {"order": [3, 1, 0, 2], "b": 0.81, "c": 1.18, "s": 0.66, "h": 0.09}, "blur": 1.1}
    img = F.resized_crop(src, *sv["crop"], [48, 48], T.InterpolationMode.BILINEAR)
    img = F.hflip(img)

    def jitter(img, j):
        for k in j["order"]:
            img = [lambda x: F.adjust_brightness(x, j["b"]), lambda x: F.adjust_contrast(x, j["c"]),
                   lambda x: F.adjust_saturation(x, j["s"]), lambda x: F.adjust_hue(x, j["h"])][k](img)
        return img

    img = jitter(img, sv["jitter"])
    img = F.perspective(img, sv["start"], sv["end"], T.InterpolationMode.BICUBIC, fill=0)
    img = jitter(img, sv["jitter2"])
    img = img.filter(ImageFilter.GaussianBlur(radius=sv["blur"]))
    op("strong_view", img, sv)

    tiny = src.crop((10, 10, 13, 12))  # 3x2: box radius larger than the line (Pillow's other branch)
    write_raw(os.path.join(REF, "op_tiny_source.rgb"), np.array(tiny))
    manifest["op_tiny_source"] = {"file": "ref/op_tiny_source.rgb", "width": 3, "height": 2}
    op("blur_tiny_2.0", tiny.filter(ImageFilter.GaussianBlur(radius=2.0)), {"radius": 2.0})
    op("resize_bicubic_1x3", src.resize((1, 3), Image.BICUBIC), {"width": 1, "height": 3})
    op("resize_bicubic_up", src.resize((131, 101), Image.BICUBIC), {"width": 131, "height": 101})
    op("resize_bilinear_down", src.resize((37, 29), Image.BILINEAR), {"width": 37, "height": 29})

    # ---- torchvision's RandomResizedCrop distribution on a 500x375 image (the sampler test compares) ----
    torch.manual_seed(0)
    areas, ratios = [], []
    for _ in range(20000):
        i, j, h, w = T.RandomResizedCrop.get_params(Image.new("RGB", (500, 375)), [0.2, 1.0], [3 / 4, 4 / 3])
        areas.append(w * h / (500 * 375))
        ratios.append(w / h)
    manifest["resized_crop_distribution"] = {"width": 500, "height": 375, "draws": 20000,
                                             "mean_area": float(np.mean(areas)), "std_area": float(np.std(areas)),
                                             "mean_ratio": float(np.mean(ratios))}

    manifest["sweep"] = shape_sweep()

    with open(os.path.join(ROOT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    total = sum(os.path.getsize(os.path.join(dp, fn)) for dp, _, fns in os.walk(ROOT) for fn in fns)
    print(f"wrote {len(manifest['images'])} images, {len(manifest['bad'])} bad cases, {len(manifest['ops'])} ops, "
          f"{total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
