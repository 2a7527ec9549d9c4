"""Checkpoint-reader fixtures for Tests/ModelsTests/CheckpointTests.swift.

Run with the reference venv (torch, safetensors):  "$NOLAD_REFERENCE_PYTHON" reference/make_checkpoint_fixtures.py

Writes Tests/ModelsTests/Fixtures/checkpoints/:
  good/model.safetensors             the state dict below (contiguous clones, safetensors cannot share)
  good/pytorch_model.bin             torch.save(state_dict) to a file: inner folder "pytorch_model/"
  archive_prefix/pytorch_model.bin   torch.save to a BytesIO: inner folder "archive/" (as older files)
  zip64/pytorch_model.bin            the same entries repacked with ZIP64 records everywhere
  proto4/pytorch_model.bin           torch.save(..., pickle_protocol=4)
  sharded/, sharded_bin/             the state dict in two shards + model.safetensors.index.json /
                                     pytorch_model.bin.index.json, as save_pretrained writes big models
  expected.json                      {name: {"shape": [...], "dtype": "...", "bits": [float32 bit patterns]}}
  bad/...                            broken files, each named after what is wrong (see BAD below)
"""
import io
import json
import os
import shutil
import struct
import zipfile
import zlib

import torch
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "Tests", "ModelsTests", "Fixtures", "checkpoints")


class Tiny(torch.nn.Module):
    """A real module, so the state dict is an OrderedDict with `_metadata` (BUILD in the pickle)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(5, 3)
        self.register_buffer("position_ids", torch.arange(7).unsqueeze(0))


def state_dict():
    g = torch.Generator().manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        model.proj.weight.copy_(torch.randn(3, 5, generator=g))
        model.proj.bias.copy_(torch.randn(3, generator=g))
    sd = model.state_dict()

    half = torch.tensor([1.0, -2.5, 65504.0, 6.0e-8, 2.0 ** -24, 2.0 ** -14 - 2.0 ** -24, 2.0 ** -14,
                         float("inf"), float("-inf"), float("nan"), -0.0, 0.333], dtype=torch.float16)
    sd["half"] = half.reshape(3, 4)
    bf = torch.randn(2, 3, generator=g).to(torch.bfloat16)
    sd["bf16"] = bf
    sd["bf16_special"] = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e-40, -0.0, 3.0e38],
                                      dtype=torch.bfloat16)
    base = torch.randn(4, 6, generator=g)
    sd["transposed"] = base.t()                     # (6, 4), stride (1, 6): not contiguous
    shared = torch.randn(5, 3, generator=g)
    sd["shared.full"] = shared                      # three views of one storage
    sd["shared.rows"] = shared[1:3]                 # storage offset 3
    sd["shared.column"] = shared[:, 2]              # offset 2, stride (3,)
    sd["half_transposed"] = torch.randn(3, 2, generator=g).to(torch.float16).t()
    sd["logit_scale"] = torch.tensor(2.6592)        # 0-d
    sd["empty"] = torch.zeros(0, 3)
    sd["param"] = torch.nn.Parameter(torch.randn(2, 2, generator=g))  # _rebuild_parameter
    return sd


def bits(t):
    return t.detach().to(torch.float32).contiguous().view(torch.int32).flatten().tolist()


def repack_zip64(source_bytes):
    """Every entry of the zip again, stored, with ZIP64 extra fields and end records."""
    src = zipfile.ZipFile(io.BytesIO(source_bytes))
    out = bytearray()
    central = bytearray()
    for info in src.infolist():
        data = src.read(info.filename)
        name = info.filename.encode()
        crc = zlib.crc32(data)
        offset = len(out)
        local_extra = struct.pack("<HHQQ", 1, 16, len(data), len(data))
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 0, 0, 0, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                           len(name), len(local_extra)) + name + local_extra + data
        extra = struct.pack("<HHQQQ", 1, 24, len(data), len(data), offset)
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, 0, 0, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                               len(name), len(extra), 0, 0, 0, 0, 0xFFFFFFFF) + name + extra
    count = len(src.infolist())
    cd_offset = len(out)
    out += central
    eocd64 = len(out)
    out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, len(central), cd_offset)
    out += struct.pack("<IIQI", 0x07064B50, 0, eocd64, 1)
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return bytes(out)


def safetensors_bytes(header, data):
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def zip_with(entries, compression=zipfile.ZIP_STORED):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as z:
        for name, data in entries:
            z.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), data, compress_type=compression)
    return buffer.getvalue()


def main():
    shutil.rmtree(ROOT, ignore_errors=True)
    for d in ["good", "archive_prefix", "zip64", "proto4", "sharded", "sharded_bin", "bad"]:
        os.makedirs(os.path.join(ROOT, d))
    sd = state_dict()

    save_file({k: v.detach().contiguous().clone() for k, v in sd.items()},
              os.path.join(ROOT, "good", "model.safetensors"), metadata={"format": "pt", "note": "fixture"})
    torch.save(sd, os.path.join(ROOT, "good", "pytorch_model.bin"))
    # Pickle protocol 4: FRAME, MEMOIZE, SHORT_BINUNICODE, STACK_GLOBAL instead of protocol 2's opcodes.
    torch.save(sd, os.path.join(ROOT, "proto4", "pytorch_model.bin"), pickle_protocol=4)
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    archive_bytes = buffer.getvalue()
    assert zipfile.ZipFile(io.BytesIO(archive_bytes)).namelist()[0].startswith("archive/")
    with open(os.path.join(ROOT, "archive_prefix", "pytorch_model.bin"), "wb") as f:
        f.write(archive_bytes)
    zip64 = repack_zip64(archive_bytes)
    with open(os.path.join(ROOT, "zip64", "pytorch_model.bin"), "wb") as f:
        f.write(zip64)
    # The repacked archive must still be what torch and zipfile read.
    reloaded = torch.load(io.BytesIO(zip64), weights_only=True)
    assert all(torch.equal(reloaded[k], sd[k]) or k in ("half", "bf16_special") for k in sd)
    zipfile.ZipFile(io.BytesIO(zip64)).testzip()

    # Shards as save_pretrained writes them for big models: two files and an index.
    names = sorted(sd)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    for folder, ext, save in [("sharded", "safetensors", lambda part, path: save_file(part, path)),
                              ("sharded_bin", "bin", lambda part, path: torch.save(part, path))]:
        weight_map = {}
        for i, part_names in enumerate(halves):
            file = f"model-{i + 1:05d}-of-00002.{ext}" if ext == "safetensors" else f"pytorch_model-{i + 1:05d}-of-00002.bin"
            part = {k: (sd[k].detach().contiguous().clone() if ext == "safetensors" else sd[k]) for k in part_names}
            save(part, os.path.join(ROOT, folder, file))
            weight_map.update({k: file for k in part_names})
        index = "model.safetensors.index.json" if ext == "safetensors" else "pytorch_model.bin.index.json"
        with open(os.path.join(ROOT, folder, index), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f, indent=1, sort_keys=True)

    expected = {}
    for k, v in sd.items():
        if v.dtype in (torch.float32, torch.float16, torch.bfloat16):
            expected[k] = {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""), "bits": bits(v)}
        else:
            expected[k] = {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
    with open(os.path.join(ROOT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=0, sort_keys=True)

    bad = os.path.join(ROOT, "bad")
    good_st = open(os.path.join(ROOT, "good", "model.safetensors"), "rb").read()
    # Truncated: the last 10 bytes of the data are gone.
    open(os.path.join(bad, "truncated.safetensors"), "wb").write(good_st[:-10])
    # Cut inside the header.
    open(os.path.join(bad, "truncated_header.safetensors"), "wb").write(good_st[:40])
    # An unknown dtype.
    open(os.path.join(bad, "unknown_dtype.safetensors"), "wb").write(safetensors_bytes(
        {"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}, b"\x00"))
    # Byte count that does not match the shape.
    open(os.path.join(bad, "size_mismatch.safetensors"), "wb").write(safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, b"\x00" * 12))
    # A hole between two tensors (a polyglot-file trick the reference reader refuses too).
    open(os.path.join(bad, "hole.safetensors"), "wb").write(safetensors_bytes(
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
         "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, b"\x00" * 12))
    # Header that is not JSON.
    open(os.path.join(bad, "not_json.safetensors"), "wb").write(struct.pack("<Q", 8) + b"{nojson}")

    # A pickle that would call os.system if a general unpickler ran it. Crafted opcode by opcode.
    evil = (b"\x80\x02" + b"cos\nsystem\n" + b"X\x0b\x00\x00\x00echo pwned!" + b"\x85" + b"R" + b".")
    open(os.path.join(bad, "forbidden_global.bin"), "wb").write(zip_with([("archive/data.pkl", evil)]))
    # The same trick through STACK_GLOBAL (protocol 4) and builtins.eval.
    evil4 = (b"\x80\x04" + b"\x8c\x08builtins" + b"\x8c\x04eval" + b"\x93" + b"\x8c\x041+1;" + b"\x85" + b"R" + b".")
    open(os.path.join(bad, "forbidden_stack_global.bin"), "wb").write(zip_with([("archive/data.pkl", evil4)]))
    # torch.save output, cut short (central directory gone).
    good_bin = open(os.path.join(ROOT, "good", "pytorch_model.bin"), "rb").read()
    open(os.path.join(bad, "truncated.bin"), "wb").write(good_bin[: len(good_bin) // 2])
    # Deflated entries (torch never writes them).
    src = zipfile.ZipFile(io.BytesIO(archive_bytes))
    open(os.path.join(bad, "compressed.bin"), "wb").write(
        zip_with([(n, src.read(n)) for n in src.namelist()], zipfile.ZIP_DEFLATED))
    # A storage whose data entry is missing.
    open(os.path.join(bad, "missing_storage.bin"), "wb").write(
        zip_with([(n, src.read(n)) for n in src.namelist() if n != "archive/data/0"]))
    # A legacy (pre-1.6, non-zip) torch.save file.
    legacy = io.BytesIO()
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    open(os.path.join(bad, "legacy.bin"), "wb").write(legacy.getvalue())
    # A folder with neither weights file.
    os.makedirs(os.path.join(bad, "empty_folder"))
    open(os.path.join(bad, "empty_folder", "config.json"), "w").write("{}\n")

    print("storage keys:", [n for n in src.namelist() if "/data/" in n])
    for root, _, files in os.walk(ROOT):
        for name in sorted(files):
            path = os.path.join(root, name)
            print(f"{os.path.relpath(path, ROOT):45s} {os.path.getsize(path):8d}")


if __name__ == "__main__":
    main()
