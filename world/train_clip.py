"""Train the tiny CLIP of the demo world (transformers CLIPModel layout, real CLIP BPE).

    python world/train_clip.py CACHE.npy OUT_DIR BUDGET_SECONDS [SEED]

CACHE.npy / CACHE.json come from `generate.py cache`. The learning rate follows a
warm-up + cosine schedule over wall time (BUDGET_SECONDS), so training ends on time
however busy the machine is; the steps done are logged and recorded in RECIPE.md by hand.
The tokenizer files (vocab.json, merges.txt) are built from open_clip's bundled BPE file.
"""

import gzip
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))
from common import byte_alphabet  # noqa: E402

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
CONTEXT = 32  # training pads/truncates captions to this many tokens (positions stay 77 in the model)


def write_bpe_files(out_dir):
    """vocab.json + merges.txt (HF CLIP layout) from open_clip's bpe_simple_vocab_16e6.txt.gz."""
    import open_clip
    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # line 0 is the "#version" header
    units = list(byte_alphabet().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.write("\n".join(merges) + "\n")


def make_config():
    from transformers import CLIPConfig
    text = dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  image_size=224, patch_size=32, hidden_act="quick_gelu")
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64, logit_scale_init_value=2.6592)


def tokenize_all(tok, captions):
    ids = tok(captions, padding="max_length", max_length=CONTEXT, truncation=True)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def main():
    cache, out_dir, budget = sys.argv[1], sys.argv[2], float(sys.argv[3])
    seed = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    torch.manual_seed(seed)
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer
    import open_clip

    write_bpe_files(out_dir)
    tok = CLIPTokenizer.from_pretrained(out_dir)  # from vocab.json + merges.txt
    tok.model_max_length = 77
    tok.save_pretrained(out_dir)
    if os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        os.remove(os.path.join(out_dir, "tokenizer.json"))  # same content as vocab.json + merges.txt
    tok = CLIPTokenizer.from_pretrained(out_dir)

    meta = json.load(open(cache.replace(".npy", ".json")))
    captions = meta["captions"]
    # check the tokenizer against open_clip's on every caption
    oc = open_clip.get_tokenizer("ViT-B-32")
    ref = oc(captions)[:, :CONTEXT]
    ids = tokenize_all(tok, captions)
    ref_ids = ref.clone()
    ref_ids[ref_ids == 0] = 49407  # open_clip pads with 0, HF with <|endoftext|>
    mism = (ids != ref_ids).any(1).sum().item()
    print(f"tokenizer check: {mism} of {len(captions)} captions differ from open_clip", flush=True)
    assert mism == 0

    images = np.load(cache, mmap_mode="r")
    n = images.shape[0]
    resume = os.environ.get("RESUME")  # continue from a saved model folder (F16 weights, read back as F32)
    model = CLIPModel.from_pretrained(resume, dtype=torch.float32) if resume else CLIPModel(make_config())
    model.train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in name or name == "logit_scale" else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    base_lr, bs, warm = float(os.environ.get("LR", "1e-3")), int(os.environ.get("BATCH", "64")), 0.03
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    step, epoch = 0, 0
    perm = torch.randperm(n, generator=g)
    pos = 0
    losses = []
    while True:
        frac = (time.time() - t0) / budget
        if frac >= 1:
            break
        lr = base_lr * (frac / warm if frac < warm else 0.5 * (1 + math.cos(math.pi * (frac - warm) / (1 - warm))))
        for grp in opt.param_groups:
            grp["lr"] = lr
        if pos + bs > n:
            perm = torch.randperm(n, generator=g)
            pos = 0
            epoch += 1
        idx = perm[pos:pos + bs].sort().values
        pos += bs
        x = torch.from_numpy(np.stack([images[i] for i in idx.tolist()])).permute(0, 3, 1, 2).float() / 255.0
        x = (x - MEAN) / STD
        t = ids[idx]
        out = model(input_ids=t, pixel_values=x)
        logits = out.logits_per_image
        labels = torch.arange(len(idx))
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        step += 1
        if step % 25 == 0:
            print(f"step {step} epoch {epoch} t {time.time() - t0:.0f}s lr {lr:.2e} loss {np.mean(losses[-25:]):.4f} "
                  f"scale {model.logit_scale.exp().item():.1f}", flush=True)
    print(f"done: {step} steps, {step * bs} pairs, {time.time() - t0:.0f}s, final loss (last 50) "
          f"{np.mean(losses[-50:]):.4f}", flush=True)
    model = model.half()
    model.save_pretrained(out_dir)
    proc = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                              do_center_crop=True, resample=3, image_mean=MEAN.flatten().tolist(),
                              image_std=STD.flatten().tolist())
    proc.save_pretrained(out_dir)


if __name__ == "__main__":
    main()
