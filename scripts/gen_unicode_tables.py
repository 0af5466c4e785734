#!/usr/bin/env python3
"""Generates include/peft/io/unicode_tables.hpp: the character classes the tokenizer's pre-tokenizers need.

Classes (one per code point, from Unicode's own data files, no Python unicodedata):
  letter      General_Category L* (Lu Ll Lt Lm Lo)            -- regex \\p{L}
  number      General_Category N* (Nd Nl No)                  -- regex \\p{N}, Rust char::is_numeric
  space       the White_Space property (PropList.txt)          -- regex \\s of Oniguruma (tokenizers' engine)
                                                                  and Rust char::is_whitespace: the same set
  mark        General_Category M* (Mn Mc Me)
  connector   General_Category Pc
No White_Space character is L, N or M, so one class per code point suffices. A flag (kWord, 0x10) marks
the code points of Rust regex \\w (UTS #18: Alphabetic, M*, Nd, Pc, Join_Control), which tokenizers uses
for added tokens with single_word.

NFC (the NFC normalizer of tokenizers, e.g. in Qwen2's tokenizer.json): canonical combining classes, full
canonical decompositions and primary composites (canonical pairs minus Full_Composition_Exclusion), from
UnicodeData.txt and DerivedNormalizationProps.txt, restricted by DerivedAge.txt to characters assigned in
Unicode <= NFC_AGE: tokenizers normalizes with the unicode-normalization-alignments crate, whose tables
are Unicode 9.0 (measured: marks of 9.0 reorder there and those of 10.0 do not; no composite of 10.0..12.1
exists, the one of 13.0 does not compose). Hangul is algorithmic (not in the tables).

Usage: python3 scripts/gen_unicode_tables.py [/usr/share/unicode] > include/peft/io/unicode_tables.hpp
(Debian: apt-get install unicode-data; bookworm ships UCD 15.0.0.)
"""
import os
import re
import sys

ucd = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/unicode"
CLASSES = {"L": 1, "N": 2, "M": 4, "Pc": 5}
NAMES = {1: "kLetter", 2: "kNumber", 3: "kSpace", 4: "kMark", 5: "kConnector"}

with open(os.path.join(ucd, "ReadMe.txt"), encoding="utf-8") as f:
    m = re.search(r"Version (\d+\.\d+\.\d+)", f.read())
version = m.group(1) if m else None
if version is None:  # the ReadMe names the version in its URL lines
    with open(os.path.join(ucd, "DerivedAge.txt"), encoding="utf-8") as f:
        version = re.search(r"DerivedAge-(\d+\.\d+\.\d+)", f.read()).group(1)

cls = {}
digits = set()
first = None
with open(os.path.join(ucd, "UnicodeData.txt"), encoding="utf-8") as f:
    for line in f:
        fields = line.split(";")
        cp = int(fields[0], 16)
        name, gc = fields[1], fields[2]
        if gc == "Nd":
            digits.update(range(first, cp + 1) if name.endswith(", Last>") else [cp])
        if gc[0] in "LNM":
            c = CLASSES[gc[0]]
        elif gc == "Pc":
            c = CLASSES["Pc"]
        else:
            c = 0
        if name.endswith(", First>"):
            first = cp
            continue
        if name.endswith(", Last>"):
            for x in range(first, cp + 1):
                if c:
                    cls[x] = c
            first = None
            continue
        if c:
            cls[cp] = c


def read_property(filename, wanted):
    out = set()
    with open(os.path.join(ucd, filename), encoding="utf-8") as f:
        for line in f:
            line = line.split("#")[0].strip()
            if not line:
                continue
            rng, prop = [s.strip() for s in line.split(";")]
            if prop != wanted:
                continue
            lo, _, hi = rng.partition("..")
            out.update(range(int(lo, 16), int(hi or lo, 16) + 1))
    return out


for x in read_property("PropList.txt", "White_Space"):
    assert x not in cls, hex(x)
    cls[x] = 3
word = read_property("DerivedCoreProperties.txt", "Alphabetic") | read_property("PropList.txt", "Join_Control")
word |= set(x for x, c in cls.items() if c in (4, 5)) | digits
for x in word:
    cls[x] = cls.get(x, 0) | 0x10

NFC_AGE = (9, 0)
age = {}
with open(os.path.join(ucd, "DerivedAge.txt"), encoding="utf-8") as f:
    for line in f:
        line = line.split("#")[0].strip()
        if not line:
            continue
        rng, a = [x.strip() for x in line.split(";")]
        lo, _, hi = rng.partition("..")
        for x in range(int(lo, 16), int(hi or lo, 16) + 1):
            age[x] = tuple(int(v) for v in a.split("."))
ccc, decomp = {}, {}
with open(os.path.join(ucd, "UnicodeData.txt"), encoding="utf-8") as f:
    for line in f:
        fields = line.split(";")
        cp = int(fields[0], 16)
        if age.get(cp, (99, 0)) > NFC_AGE:
            continue
        if int(fields[3]):
            ccc[cp] = int(fields[3])
        if fields[5] and not fields[5].startswith("<"):
            decomp[cp] = [int(x, 16) for x in fields[5].split()]
full_exclusion = set()
with open(os.path.join(ucd, "DerivedNormalizationProps.txt"), encoding="utf-8") as f:
    for line in f:
        line = line.split("#")[0].strip()
        if line and line.split(";")[1].strip() == "Full_Composition_Exclusion":
            lo, _, hi = line.split(";")[0].strip().partition("..")
            full_exclusion.update(range(int(lo, 16), int(hi or lo, 16) + 1))


def full_decomposition(cp):
    if cp not in decomp:
        return [cp]
    return [x for part in decomp[cp] for x in full_decomposition(part)]


compositions = sorted((d[0], d[1], cp) for cp, d in decomp.items() if len(d) == 2 and cp not in full_exclusion)
ccc_ranges = []
for cp in sorted(ccc):
    if ccc_ranges and ccc_ranges[-1][1] == cp - 1 and ccc_ranges[-1][2] == ccc[cp]:
        ccc_ranges[-1][1] = cp
    else:
        ccc_ranges.append([cp, cp, ccc[cp]])
pool, decomp_rows = [], []
for cp in sorted(decomp):
    full = full_decomposition(cp)
    decomp_rows.append((cp, len(pool), len(full)))
    pool.extend(full)

ranges = []
for cp in sorted(cls):
    c = cls[cp]
    if ranges and ranges[-1][1] == cp - 1 and ranges[-1][2] == c:
        ranges[-1][1] = cp
    else:
        ranges.append([cp, cp, c])

out = []
out.append("#pragma once")
out.append("// GENERATED by scripts/gen_unicode_tables.py from the Unicode Character Database %s" % version)
out.append("// (UnicodeData.txt: General_Category L*, N*, M*, Pc; PropList.txt: White_Space). Do not edit.")
out.append("// Hugging Face tokenizers 0.23.3 matches \\p{L} / \\p{N} / \\s with Oniguruma, whose tables are")
out.append("// Unicode 16.0: code points assigned after %s (e.g. CJK Extension I U+2EBF0.., Garay U+10D40..)" % version)
out.append("// are class 0 here but letters / numbers there. See tests/data/tokenizers/README.md.")
out.append("#include <cstddef>")
out.append("#include <cstdint>")
out.append("")
out.append("namespace peft::io::unicode {")
out.append("")
out.append('/// Unicode version of these tables.')
out.append('constexpr const char* kTablesVersion = "%s";' % version)
out.append("")
out.append("enum CharClass : std::uint8_t { kOther = 0, kLetter = 1, kNumber = 2, kSpace = 3, kMark = 4, kConnector = 5 };")
out.append("/// Flag or-ed into ClassRange::cls: the code point is in Rust regex \\\\w.")
out.append("constexpr std::uint8_t kWord = 0x10;")
out.append("")
out.append("struct ClassRange {")
out.append("  std::uint32_t lo, hi;")
out.append("  std::uint8_t cls;")
out.append("};")
out.append("")
out.append("/// Sorted, disjoint ranges [lo, hi] of code points with a class (low 4 bits) and the kWord flag;")
out.append("/// every other code point is kOther.")
out.append("// clang-format off")
out.append("inline constexpr ClassRange kClassRanges[] = {")
line = "   "
for lo, hi, c in ranges:
    name = NAMES[c & 0x0F] if c & 0x0F else "kOther"
    item = " {0x%X, 0x%X, %s}," % (lo, hi, name + " | kWord" if c & 0x10 else name)
    if len(line) + len(item) > 118:
        out.append(line)
        line = "   "
    line += item
out.append(line)
out.append("};")
out.append("// clang-format on")
out.append("")
out.append("inline constexpr std::size_t kClassRangeCount = sizeof(kClassRanges) / sizeof(kClassRanges[0]);")
out.append("")
out.append("/// NFC tables: characters assigned in Unicode <= %d.%d (tokenizers' NFC normalizer)." % NFC_AGE)
out.append('constexpr const char* kNfcVersion = "%d.%d";' % NFC_AGE)
out.append("")
out.append("struct CccRange {")
out.append("  std::uint32_t lo, hi;")
out.append("  std::uint8_t ccc;")
out.append("};")
out.append("struct Decomposition {")
out.append("  std::uint32_t cp;")
out.append("  std::uint16_t offset, length;  // into kDecompositionPool")
out.append("};")
out.append("struct Composition {")
out.append("  std::uint32_t first, second, composite;")
out.append("};")
out.append("")


def emit(name, typ, items):
    out.append("// clang-format off")
    out.append("inline constexpr %s %s[] = {" % (typ, name))
    line = "   "
    for item in items:
        item = " " + item + ","
        if len(line) + len(item) > 118:
            out.append(line)
            line = "   "
        line += item
    out.append(line)
    out.append("};")
    out.append("// clang-format on")


out.append("/// Non-zero canonical combining classes, sorted ranges.")
emit("kCccRanges", "CccRange", ["{0x%X, 0x%X, %d}" % tuple(r) for r in ccc_ranges])
out.append("/// Full canonical decompositions, sorted by code point.")
emit("kDecompositions", "Decomposition", ["{0x%X, %d, %d}" % r for r in decomp_rows])
emit("kDecompositionPool", "std::uint32_t", ["0x%X" % x for x in pool])
out.append("/// Primary composites, sorted by (first, second).")
emit("kCompositions", "Composition", ["{0x%X, 0x%X, 0x%X}" % c for c in compositions])
out.append("inline constexpr std::size_t kCccRangeCount = sizeof(kCccRanges) / sizeof(kCccRanges[0]);")
out.append("inline constexpr std::size_t kDecompositionCount = sizeof(kDecompositions) / sizeof(kDecompositions[0]);")
out.append("inline constexpr std::size_t kCompositionCount = sizeof(kCompositions) / sizeof(kCompositions[0]);")
out.append("")
out.append("}  // namespace peft::io::unicode")
print("\n".join(out))
print("%d class ranges, %d ccc ranges, %d decompositions (%d code points), %d compositions" %
      (len(ranges), len(ccc_ranges), len(decomp_rows), len(pool), len(compositions)), file=sys.stderr)
