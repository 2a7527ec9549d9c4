"""How much can the alignment module (NoLA stage 2) gain on a labelled collection, and what limits it?

    python world/diagnose_alignment.py [DINO_FOLDER ...]

On Demo/collection (or --collection) with the tiny CLIP (or --clip), for several sets of class sentences:
zero-shot accuracy, precision of the top-k pseudo-labels, and in how many classes the most frequent
pseudo-label among that class's selected images is the right one. An alignment module trained on those
pseudo-labels maps each well-separated feature cluster to its most frequent pseudo-label, so that count
bounds what any feature extractor can reach. Then the alignment module's accuracy (the reference's MLP,
Adam, 50 epochs, batch 32) on: the CLIP image features, each DINO folder given, and synthetic features
whose class separation is known (one random 64-d centre per true class plus Gaussian noise of the given
scale) -- the last shows the accuracy an ideal DINO would give. True labels are used for scoring and for
the synthetic features only; this is a diagnosis, not part of the method.
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nola_reference as R  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def text_classifier(clip, tok, classes, sentences):
    vecs = []
    with torch.no_grad():
        for c in classes:
            e = clip.get_text_features(**tok(sentences(c), padding=True, return_tensors="pt"))
            e = e.pooler_output if hasattr(e, "pooler_output") else e
            vecs.append(F.normalize(F.normalize(e, dim=-1).mean(0), dim=0))
    return torch.stack(vecs)


def alignment_accuracy(feats, idx, pl, labels, C, seed=0):
    mlp = R.train_alignment(feats, idx, pl, C, seed)
    with torch.no_grad():
        return (mlp(feats).argmax(1) == labels).float().mean().item()


def centroid_accuracy(feats, labels, C):
    f = F.normalize(feats - feats.mean(0), dim=-1)
    cent = F.normalize(torch.stack([f[labels == c].mean(0) for c in range(C)]), dim=-1)
    return ((f @ cent.t()).argmax(1) == labels).float().mean().item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dino", nargs="*")
    ap.add_argument("--clip", default=os.path.join(ROOT, "Demo/models/tiny-clip"))
    ap.add_argument("--collection", default=os.path.join(ROOT, "Demo/collection"))
    ap.add_argument("--descriptions", default=os.path.join(ROOT, "Demo/descriptions.json"))
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    from transformers import CLIPModel, CLIPTokenizer, ViTModel

    clip = CLIPModel.from_pretrained(args.clip, dtype=torch.float32).eval()
    tok = CLIPTokenizer.from_pretrained(args.clip)
    classes, paths, labels = R.load_collection(args.collection)
    descriptions = json.load(open(args.descriptions))
    weak = torch.stack([R.weak_view(Image.open(p).convert("RGB")) for p in paths])
    N, C = len(paths), len(classes)
    k = max(16, math.floor(0.2 * N / C))
    with torch.no_grad():
        feats = torch.cat([R.clip_image_embeds(clip, weak[i:i + 128]) for i in range(0, N, 128)])
    print(f"{N} images, {C} classes, k {k}")

    sentence_sets = {
        "templates + descriptions (as the pipeline)": lambda c: [t.format(c) for t in R.TEMPLATES] + descriptions[c],
        "templates only": lambda c: [t.format(c) for t in R.TEMPLATES],
        "descriptions only": lambda c: descriptions[c],
    }
    selections = {}
    for name, sentences in sentence_sets.items():
        W = text_classifier(clip, tok, classes, sentences)
        probs = (clip.logit_scale.exp() * F.normalize(feats, dim=-1) @ W.t()).softmax(-1)
        idx, pl = R.pseudo_labels(probs, k)
        counts = torch.zeros(C, C, dtype=torch.long)
        for t, p in zip(labels[idx].tolist(), pl.tolist()):
            counts[t, p] += 1
        right = [classes[c] for c in range(C) if counts[c].sum() and counts[c].argmax() == c]
        print(f"{name}: zero-shot {100 * (probs.argmax(1) == labels).float().mean():.1f} %, pseudo-labels "
              f"{len(idx)} at {100 * (pl == labels[idx]).float().mean():.1f} %, most frequent pseudo-label right "
              f"in {len(right)}/{C} classes ({', '.join(right)})")
        selections[name] = (idx, pl)

    for name, (idx, pl) in selections.items():
        print(f"alignment module on the pseudo-labels of {name}:")
        rows = [("CLIP image features", feats)]
        for folder in args.dino:
            dino = ViTModel.from_pretrained(folder, dtype=torch.float32, add_pooling_layer=False).eval()
            with torch.no_grad():
                rows.append((f"DINO {folder}", torch.cat([dino(pixel_values=weak[i:i + 64]).last_hidden_state[:, 0]
                                                         for i in range(0, N, 64)])))
        g = torch.Generator().manual_seed(1)
        centres = torch.randn(C, 64, generator=g)
        for noise in (1.0, 2.0, 3.0, 4.0):
            rows.append((f"synthetic, noise {noise}", F.one_hot(labels, C).float() @ centres
                         + noise * torch.randn(N, 64, generator=g)))
        for label, f in rows:
            print(f"  {label:<40} centroid (true labels) {100 * centroid_accuracy(f, labels, C):5.1f} %   "
                  f"alignment module {100 * alignment_accuracy(f, idx, pl, labels, C):5.1f} %")


if __name__ == "__main__":
    main()
