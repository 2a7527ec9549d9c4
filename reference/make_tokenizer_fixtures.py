"""CLIP tokenizer fixtures for Tests/ModelsTests/TokenizerTests.swift.

Run with the reference venv:  "$NOLAD_REFERENCE_PYTHON" reference/make_tokenizer_fixtures.py

1. Builds vocab.json + merges.txt in Hugging Face layout from open_clip's bpe_simple_vocab_16e6.txt.gz
   (the file OpenAI's CLIP ships): 256 byte symbols, the same 256 with "</w>", one token per merge
   (the first 48894 lines after the header), then <|startoftext|> = 49406 and <|endoftext|> = 49407.
   Checked: transformers' CLIPTokenizer loaded from these files gives open_clip's ids on ordinary text.
2. Tokenises a list of hard strings with transformers' CLIPTokenizer (the reference we match) and with
   open_clip's tokenizer, and writes cases.json: [{"text", "ids" (transformers, BOS/EOS, untruncated),
   "ids77" (transformers, truncation to 77), "open_clip" (ids, same layout), "agree": bool}];
   then 300 seeded random mixtures of letters, digits, whitespace, punctuation, accents, combining
   marks, CJK, emoji, special-token fragments (a one-off run of 3000 such strings also matched).

Where they differ (by design, see CLIPTokenizer.swift): open_clip runs ftfy.fix_text and
html.unescape twice before cleaning, splits whitespace with Python's str.split, lower-cases with
str.lower (final-sigma aware) and does not treat "<|endoftext|>" as special (its specials are
"<start_of_text>"/"<end_of_text>"); transformers normalises NFC, replaces \\s+ (Unicode White_Space)
with one space, lower-cases character by character and splits out the literal special tokens.
"""
import gzip
import json
import os
import random

import open_clip
from transformers import CLIPTokenizer
import sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import byte_alphabet  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "Tests", "ModelsTests", "Fixtures", "tokenizer")
BPE = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")


def build_files():
    lines = gzip.open(BPE).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    symbols = list(byte_alphabet().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408 and len(set(vocab)) == 49408
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(OUT, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


HARD = [
    "a photo of a cat.",
    "A Photo Of A CAT",
    "",
    " ",
    "   leading and trailing   ",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u2003em\u3000ideographic",
    "zero\u200bwidth\u200bspace and\ufeffbom",
    "file\x1cseparator\x1dunit\x1e\x1f and\x85nel\u2028ls",
    "Café naïve façade résumé",
    "Cafe\u0301 decomposed e\u0301",
    "Ångström ÅNGSTRÖM",
    "straße STRASSE ß",
    "İstanbul ΟΔΟΣ Σίσυφος",
    "Ǆemal ǅ",
    "東京タワーの写真",
    "한국어 텍스트",
    "日本語とEnglishのmix",
    "Ελληνικά и русский текст",
    "עברית العربية हिन्दी",
    "emoji 😀😀 👍🏽 🇫🇷 flags",
    "family 👨‍👩‍👧‍👦 zwj and ❤️ heart",
    "!!! ??? ... --- *** !?!?",
    "a,b;c:d/e\\f|g",
    "(parentheses) [brackets] {braces} <angles>",
    "\"double\" 'single' `back` «guillemets» „low“",
    "1,234.5 and 1234567890 and 3.14159 and -42 and 1e10",
    "½ ² ³ ⅷ ٣ ४ 10th 2nd",
    "it's don't they're we've I'm you'll he'd",
    "IT'S DON'T THEY'RE WE'VE I'M YOU'LL HE'D",
    "'s 't 're 've 'm 'll 'd 'x ''s '''",
    "the dog's bone's owner's",
    "rock'n'roll o'clock",
    "<|endoftext|>",
    "a<|endoftext|>b",
    "<|startoftext|>hello<|endoftext|>",
    "<|ENDOFTEXT|> <|EndOfText|>",
    "< |endoftext| >",
    "<|endoftext|́x",
    "<|endoftext|>́x",
    " <|endoftext|> ",
    "x<|startoftext|><|endoftext|>y",
    "<|endoftext|",
    "!!<|endoftext|>",
    "é<|endoftext|>́",
    "Abİ",
    "<start_of_text> <end_of_text>",
    "&amp; &lt;b&gt; &quot;quoted&quot; &#39;s &nbsp; AT&T",
    "Tom &amp;amp; Jerry",
    "mojibake: cafÃ©",
    "http://example.com/path?q=1&r=2#frag",
    "email@example.com #hashtag @mention $100 50% ~tilde^",
    "snake_case_word camelCaseWord kebab-case-word",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "tabby cat, a type of domestic cat with a distinctive 'M' marking on its forehead.",
    "\u0000null\u0007bell\u001bescape",
    "combining: a\u0300\u0301\u0302 n\u0303",
    "math: ∑∫∂√∞ ≠ ≤ ≥ → ⇒",
    "fullwidth ＡＢＣ １２３ ！",
    "ﬁ ligature ﬀ",
    "𝓯𝓪𝓷𝓬𝔂 𝕥𝕖𝕩𝕥",
    "a " * 100,
    "1234567890" * 10,
    "東京" * 40,
    ("an over-long description of a golden retriever puppy playing in the snow, "
     "with fluffy fur, a red collar, bright eyes and a wagging tail, next to a wooden fence "
     "under a clear blue winter sky with mountains far away in the background, photographed at dusk."),
]


def random_strings(count, seed=1):
    """Random mixtures of the character classes the pre-tokeniser distinguishes, and special fragments."""
    rng = random.Random(seed)
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789", " \t\n\r\x0b\x0c\x85\xa0\u2003\u3000\u200b\x1c",
        "'\"!?.,;:-_()[]{}<>|/\\@#$%^&*~`+=",
        "éèêëÉÀÖüßçñøåÆœĲǅİıΣσςΩ",
        "\u0301\u0300\u0308\u0327\u20dd",
        "東京日本語中文한국어ひらがなカタカナ",
        "😀👍🏽🇫🇷❤️\u200d👨👩👧\ufe0f",
        "½²³ⅷ٣४①⑩",
        "ﬁﬀＡＢＣ１２３！𝓯𝕥",
        "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВ",
        "αβγδεζηθικλμνξοπρστυφχψω",
    ]
    words = ["<|endoftext|>", "<|startoftext|>", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL",
             "photo", "cat", "the", "of", "a", "dog's", "it's", "&amp;", "1,234.5", "<|", "|>"]
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(0, 12)):
            if rng.random() < 0.3:
                parts.append(rng.choice(words))
            else:
                pool = rng.choice(pools)
                parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 8))))
        texts.append(rng.choice(["", " "]).join(parts))
    return texts


def main():
    build_files()
    hf = CLIPTokenizer.from_pretrained(OUT)
    oc = open_clip.get_tokenizer("ViT-B-32")
    assert hf.bos_token_id == 49406 and hf.eos_token_id == 49407
    # The files reproduce open_clip's vocabulary: ordinary text gives the same ids.
    for text in ["a photo of a cat.", "a bad photo of the large dog!", "tabby cat, a type of domestic cat"]:
        ids = hf(text)["input_ids"]
        assert ids == [oc.sot_token_id] + oc.encode(text) + [oc.eot_token_id], text

    cases = []
    for text in HARD + random_strings(300):
        ids = hf(text)["input_ids"]
        ids77 = hf(text, truncation=True, max_length=77)["input_ids"]
        oc_ids = [oc.sot_token_id] + oc.encode(text) + [oc.eot_token_id]
        cases.append({"text": text, "ids": ids, "ids77": ids77, "open_clip": oc_ids, "agree": ids == oc_ids})
        if ids != oc_ids and text in HARD:
            print("differs from open_clip:", repr(text[:60]))
            print("   transformers", hf.convert_ids_to_tokens(ids)[:30])
            print("   open_clip   ", hf.convert_ids_to_tokens(oc_ids)[:30])
    with open(os.path.join(OUT, "cases.json"), "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(json.dumps(c, ensure_ascii=False) for c in cases) + "\n]\n")
    print(len(cases), "cases,", sum(c["agree"] for c in cases), "where transformers and open_clip agree")


if __name__ == "__main__":
    main()
