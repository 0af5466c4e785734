#!/usr/bin/env python3
"""Reference fixtures for peft/io/tokenizer.hpp, made by the real Hugging Face `tokenizers` package.

Trains small BPE tokenizers offline (no Hugging Face hub) on a local corpus (Debian's license texts
under /usr/share/common-licenses plus a few lines of several scripts), configured like the
tokenizer.json files of real Llama-family models, and writes for each one

  tests/data/tokenizers/<name>/tokenizer.json   Tokenizer.save(pretty=False), as tokenizers writes it
  tests/data/tokenizers/<name>/expected.json    for every string of strings.json: ids without and with
                                                special tokens (add_special_tokens False / True),
                                                decode(ids_with_specials) with skip_special_tokens
                                                False / True, and (where there is one) the pieces of
                                                the pre-tokenizer alone on the whole text

  tests/data/tokenizers/strings.json            the tricky strings (fixed ones + seeded random mixes)

Kinds:
  gpt2     ByteLevel pre-tokenizer (GPT-2 regex), ByteLevel decoder/post-processor; merges in the legacy
           "a b" string form; <|endoftext|> special; a single_word added token "dog"
  llama3   Split(Llama 3 regex, Isolated) + ByteLevel(use_regex=false), ignore_merges, TemplateProcessing
           adding <|begin_of_text|>; special tokens incl. one not in text; an added token with lstrip/rstrip;
           a vocab entry reachable only through ignore_merges
  qwen2    NFC normalizer, Split(Qwen2 regex: \\p{N} one digit) + ByteLevel(use_regex=false)
  smollm   Sequence[Digits(individual_digits), ByteLevel(use_regex=true)], <|im_start|> / <|im_end|>
  llama2   normalizer Sequence[Prepend(▁), Replace(" ", ▁)], no pre-tokenizer, BPE byte_fallback + fuse_unk,
           <unk> <s> </s> then <0x00>..<0xFF> first in the vocab, decoder Sequence[Replace, ByteFallback,
           Fuse, Strip], TemplateProcessing adding <s>
  mistral  Metaspace pre-tokenizer (prepend_scheme first, split false) and Metaspace decoder,
           byte_fallback false and fuse_unk true (so <unk> is produced and fused), <s> added
  gpt2_prefix      gpt2 with ByteLevel add_prefix_space=true and a normalized added token "hello world"
  llama2_added     llama2 plus a normalized added token "day" (matched as "▁day") and a special <pad>
  metaspace_split  mistral's model under Sequence[Digits(contiguous), Metaspace(always, split=true)],
                   Metaspace decoder (always), a normalized added token "[DAY]"

Usage: ~/.cache/peft-peer/bin/python benchmarks/peer/make_tokenizer_fixtures.py tests/data/tokenizers
       ~/.cache/peft-peer/bin/python benchmarks/peer/make_tokenizer_fixtures.py --unicode-diff [/usr/share/unicode]
         lists the code points where tokenizers' regex engine (Oniguruma) classes \\p{L}, \\p{N}, \\s differ
         from the UCD that scripts/gen_unicode_tables.py reads (~10 s)
"""
import glob
import json
import os
import random
import sys

import tokenizers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
            r"\s*[\r\n]+|\s+(?!\S)|\s+")

EXTRA_LINES = [
    "Привет, мир! Это проверка токенизатора.", "Γειά σου κόσμε, καλημέρα.", "こんにちは世界、東京都。",
    "你好，世界。我们今天学习。", "مرحبا بالعالم", "नमस्ते दुनिया, यह परीक्षण है।", "สวัสดีชาวโลก",
    "Ünïcödé façade naïve café résumé", "I'LL BE THERE, YOU'RE RIGHT, IT'S 12345 O'CLOCK",
    "don't won't can't we've they'd she'll", "def f(x):\n\treturn x * 2  # comment\r\n",
]

FIXED = [
    "", " ", "  ", "\t", "\n", "\r\n", " \n\n ", "Hello world", " Hello world", "Hello  world  ", "hello\tworld\n",
    "I'LL DO IT, I'll do it, it'S fine", "don't you're we've they'd I'm she'll", "'s 's' 'S", "IT'ſ",
    "1234567890 3.14159 -42 1,000,000", "x=1+2*3/4", "a1b22c333d4444",
    "Ünïcödé façade naïve café", "e\u0301 a\u0308 n\u0303 combining\u0301\u0301", "Привет, мир!", "Γειά σου κόσμε",
    "こんにちは世界", "你好，世界。", "مرحبا بالعالم", "नमस्ते दुनिया", "สวัสดีชาวโลก",
    "emoji 😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️", "tabs\t\tand\t spaces   \t end", "line1\nline2\r\nline3\r\r\n\n",
    "trailing spaces   ", "   leading", "\u00a0nbsp\u00a0\u3000ideographic\u2003em", "zero\u200bwidth\u200djoin",
    "<|endoftext|>", "Hello<|endoftext|>world", "a <|endoftext|> b", "<s>Hello</s>", "hi <s> there </s> ok",
    "<|begin_of_text|>Hi<|eot_id|>", "<|im_start|>user\nhi<|im_end|>", "use <tool>  now", "x<tool>y",
    "the dog, a hotdog, dog.", "\fdog½ dog٣ dogé Ⓐdog dog_ dog‍", " zzzzqq", "zzzzqq", "<unk>", "~!@#$%^&*()_+`-={}[]|\\:;\"'<>,.?/",
    "MixedCASE camelCase snake_case kebab-case", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "\U0001F600\U0001F600\U0001F600", "végétal\n\n\n   \t x", "١٢٣ ٤٥٦ Ⅻ ½ ²",
    "say hello world, hello  world", "one day, [DAY] a daydream [DAY]", "pad<pad><pad> x",
    "NFC: A\u030a \u212b \u1100\u1161\u11a8 \uac00\u11a8 q\u0307\u0323 \u0344 \U00011935\U00011930 \ufb01 \u2126",
]

POOL = list("aAbBzZ eE0189 '’\t\n\r.,!?-_()<>|") + ["'s", "'LL", "ſ", "é", "e\u0301", "ß", "Ж", "λ", "中", "文", "あ",
                                                     "ا", "न", "ि", "ก", "😀", "👍🏽", "👨‍👩‍👧", "\u00a0", "\u3000", "½", "Ⅻ",
                                                     "٣", "<s>", "</s>", "<|endoftext|>", "<tool>", "dog", "  ", "\r\n",
                                                     "hello world", "day", "[DAY]", "<pad>", "42",
                                                     "\u0301", "\u0323", "\u1100", "\u1161", "\u11a8", "\u212b"]


def corpus_lines():
    lines = []
    for path in sorted(glob.glob("/usr/share/common-licenses/*")):
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                lines.extend(f.read().splitlines())
    lines.extend(EXTRA_LINES * 20)
    return lines


def strings():
    rng = random.Random(13)
    out = list(FIXED)
    for _ in range(40):
        out.append("".join(rng.choice(POOL) for _ in range(rng.randint(3, 30))))
    return out


def byte_level_tokenizer(pre, specials, vocab_size, post=None, ignore_merges=False, added=()):
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=specials, show_progress=False)
    tok.train_from_iterator(corpus_lines(), trainer)
    tok.post_processor = post or processors.ByteLevel(trim_offsets=False)
    if added:
        tok.add_tokens(list(added))
    return tok


def make_gpt2():
    tok = byte_level_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False), ["<|endoftext|>"], 700,
                               added=[AddedToken("dog", single_word=True, normalized=False)])
    data = json.loads(tok.to_str())
    data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]  # the legacy "a b" form
    return Tokenizer.from_str(json.dumps(data))


def make_split_bytelevel(regex, specials, bos, vocab_size, ignore_merges, added=()):
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    post = None
    if bos:
        post = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=bos + " $A", pair=bos + " $A " + bos + " $B:1",
                                          special_tokens=[(bos, specials.index(bos) + 0)])])
    tok = byte_level_tokenizer(pre, specials, vocab_size, post=post, ignore_merges=ignore_merges, added=added)
    if bos:  # ids of special tokens are known only after training: rebuild the template with the real id
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=bos + " $A", pair=bos + " $A " + bos + " $B:1",
                                          special_tokens=[(bos, tok.token_to_id(bos))])])
    return tok


def make_llama3():
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|eot_id|>"]
    tok = make_split_bytelevel(LLAMA3_RE, specials, "<|begin_of_text|>", 800, True,
                               added=[AddedToken("<tool>", lstrip=True, rstrip=True, normalized=False)])
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    vocab["Ġzzzzqq"] = max(vocab.values()) + 1  # only reachable with ignore_merges (no merge makes it)
    for t in data["added_tokens"]:
        t["id"] = t["id"] + 1 if t["id"] >= vocab["Ġzzzzqq"] else t["id"]
    return Tokenizer.from_str(json.dumps(data))


def make_qwen2():
    tok = make_split_bytelevel(QWEN2_RE, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, 600, False)
    tok.normalizer = normalizers.NFC()  # as in Qwen2's tokenizer.json
    return tok


def make_smollm():
    pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    return byte_level_tokenizer(pre, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], 600)


def train_metaspace(vocab_size, limit_alphabet):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, limit_alphabet=limit_alphabet, show_progress=False)
    tok.train_from_iterator(corpus_lines(), trainer)
    return json.loads(tok.to_str())


def make_llama2():
    data = train_metaspace(700, 90)
    trained = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab["<0x%02X>" % b] = len(vocab)
    for tok, _ in trained:
        if tok not in vocab:
            vocab[tok] = len(vocab)
    data["model"].update(vocab=vocab, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    data["added_tokens"] = [dict(id=i, content=c, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                 special=True) for i, c in enumerate(["<unk>", "<s>", "</s>"])]
    data["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                              {"type": "Replace", "pattern": {"String": " "},
                                                               "content": "▁"}]}
    data["pre_tokenizer"] = None
    data["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    tok = Tokenizer.from_str(json.dumps(data))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                       special_tokens=[("<s>", 1)])
    return tok


def make_mistral():
    data = train_metaspace(500, 60)
    trained = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for tok, _ in trained:
        if tok not in vocab:
            vocab[tok] = len(vocab)
    data["model"].update(vocab=vocab, unk_token="<unk>", fuse_unk=True, byte_fallback=False)
    data["added_tokens"] = [dict(id=i, content=c, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                 special=True) for i, c in enumerate(["<unk>", "<s>", "</s>"])]
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    data["decoder"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    tok = Tokenizer.from_str(json.dumps(data))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                       special_tokens=[("<s>", 1)])
    return tok


def make_gpt2_prefix():
    """gpt2 with ByteLevel add_prefix_space=true and a normalized (non-special) added token."""
    data = json.loads(make_gpt2().to_str())
    data["pre_tokenizer"]["add_prefix_space"] = True
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_tokens([AddedToken("hello world", normalized=True)])
    return tok


def make_llama2_added():
    """llama2 plus a normalized added token (matched against its normalized form "▁day") and a special <pad>."""
    tok = make_llama2()
    tok.add_tokens([AddedToken("day", normalized=True)])
    tok.add_special_tokens([AddedToken("<pad>", special=True, normalized=False)])
    return tok


def make_metaspace_split():
    """mistral's model with Sequence[Digits(contiguous), Metaspace(always, split)], a normalized [DAY] token."""
    data = json.loads(make_mistral().to_str())
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": False},
        {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}]}
    data["decoder"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_tokens([AddedToken("[DAY]", normalized=True)])
    return tok


def unicode_diff(ucd):
    cps = [c for c in range(0x110000) if not (0xD800 <= c <= 0xDFFF)]
    text = "".join(map(chr, cps))

    def matched(rx):  # the code points the reference engine matches with rx
        pieces = pre_tokenizers.Split(Regex(rx), behavior="removed").pre_tokenize_str(text)
        covered = bytearray(len(cps))
        for _, (a, b) in pieces:
            covered[a:b] = b"\x01" * (b - a)
        return set(cps[k] for k in range(len(cps)) if not covered[k])

    ref = {k: matched(rx) for k, rx in [("L", r"\p{L}"), ("N", r"\p{N}"), ("White_Space", r"\s")]}
    ours = {"L": set(), "N": set(), "White_Space": set()}
    first = None
    with open(os.path.join(ucd, "UnicodeData.txt"), encoding="utf-8") as f:
        for line in f:
            fields = line.split(";")
            cp, name, gc = int(fields[0], 16), fields[1], fields[2]
            if name.endswith(", First>"):
                first = cp
                continue
            if gc[0] in "LN":
                ours[gc[0]].update(range(first, cp + 1) if name.endswith(", Last>") else [cp])
    with open(os.path.join(ucd, "PropList.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line and line.split(";")[1].strip() == "White_Space":
                lo, _, hi = line.split(";")[0].strip().partition("..")
                ours["White_Space"].update(range(int(lo, 16), int(hi or lo, 16) + 1))

    def ranges(points):
        out = []
        for c in sorted(points):
            if out and out[-1][1] == c - 1:
                out[-1][1] = c
            else:
                out.append([c, c])
        return ", ".join("U+%04X" % a if a == b else "U+%04X..%04X" % (a, b) for a, b in out)

    for k in ref:
        print("%s: %d only in tokenizers' engine, %d only in the UCD tables" % (k, len(ref[k] - ours[k]),
                                                                             len(ours[k] - ref[k])))
        for label, points in (("  engine only: ", ref[k] - ours[k]), ("  tables only: ", ours[k] - ref[k])):
            if points:
                print(label + ranges(points))


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--unicode-diff":
        unicode_diff(sys.argv[2] if len(sys.argv) > 2 else "/usr/share/unicode")
        return
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "tests/data/tokenizers"
    texts = strings()
    with open(os.path.join(out_dir, "strings.json"), "w", encoding="utf-8") as f:
        json.dump(texts, f, ensure_ascii=False, indent=0)  # one string a line
        f.write("\n")
    makers = dict(gpt2=make_gpt2, llama3=make_llama3, qwen2=make_qwen2, smollm=make_smollm, llama2=make_llama2,
                  mistral=make_mistral, gpt2_prefix=make_gpt2_prefix, llama2_added=make_llama2_added,
                  metaspace_split=make_metaspace_split)
    for name, make in makers.items():
        tok = make()
        d = os.path.join(out_dir, name)
        os.makedirs(d, exist_ok=True)
        tok.save(os.path.join(d, "tokenizer.json"), pretty=False)  # compact: the fixture stays small
        tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))  # reference from the file as committed
        rows = []
        n_ids = 0
        for text in texts:
            plain = tok.encode(text, add_special_tokens=False).ids
            special = tok.encode(text, add_special_tokens=True).ids
            row = dict(text=text, ids=plain, ids_special=special,
                       decoded=tok.decode(special, skip_special_tokens=False),
                       decoded_skip=tok.decode(special, skip_special_tokens=True))
            if tok.pre_tokenizer is not None:  # the pre-tokenizer alone on the whole text (no added tokens)
                row["pre"] = [piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str(text)]
            rows.append(row)
            n_ids += len(plain) + len(special)
        with open(os.path.join(d, "expected.json"), "w", encoding="utf-8") as f:  # one case a line
            f.write('{"tokenizers": %s, "cases": [\n' % json.dumps(tokenizers.__version__))
            f.write(",\n".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in rows))
            f.write("\n]}\n")
        print("%s: vocab %d, %d strings, %d ids" % (name, tok.get_vocab_size(), len(rows), n_ids))


if __name__ == "__main__":
    main()
