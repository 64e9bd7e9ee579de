"""Rebuild the default data shipped in python/seft_ext/data/ from Debian packages.

    python scripts/build_data.py            # needs apt-get (Debian / Ubuntu); writes the files

- kjv_train.txt / kjv_heldout.txt: the King James Bible (1611, public domain) from the
  packages bible-kjv-text + bible-kjv (its `bible` reader): Genesis and Exodus for
  training, Ruth, Esther and Jonah held out. Verse numbers and chapter headings removed;
  one chapter per paragraph.
- wordnet_mc_{train,heldout}.jsonl: "which word is defined" 4-way multiple choice from
  WordNet 3.0 nouns (package wordnet-base): the gloss of a noun synset with a one-word
  lemma, the lemma, and 3 one-word lemmas of other random synsets. Fixed seed.
- austen_train.txt.gz / austen_heldout.txt.gz: the general text (Jane Austen's novels, public
  domain) from the package r-cran-janeaustenr (the novels as R character vectors, read here
  without R): Pride and Prejudice for training, Persuasion chapters 1-5 held out. One
  paragraph per line, chapters separated by a blank line, chapter headings and the _italics_
  marks removed. Compressed with gzip (no timestamp, so the files are reproducible).
"""
from __future__ import annotations

import gzip
import json
import random
import re
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "python" / "seft_ext" / "data"
TRAIN_BOOKS = [("gen", 50), ("exo", 40)]
HELDOUT_BOOKS = [("ruth", 4), ("esth", 10), ("jonah", 4)]
N_TRAIN, N_HELDOUT, SEED = 2000, 500, 0
AUSTEN_RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
AUSTEN_TRAIN, AUSTEN_HELDOUT, AUSTEN_HELDOUT_CHAPTERS = "PRIDE AND PREJUDICE", "Persuasion", 5


def fetch(tmp: Path) -> Path:
    subprocess.run(["apt-get", "download", "bible-kjv-text", "bible-kjv", "wordnet-base",
                    "r-cran-janeaustenr"], cwd=tmp, check=True,
                   capture_output=True)
    root = tmp / "root"
    for deb in tmp.glob("*.deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def chapter_text(root: Path, book: str, chapter: int) -> str:
    verses = f"{book}{chapter}:1-{book}{chapter}:200"
    out = subprocess.run([str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), verses],
                         check=True, capture_output=True, text=True).stdout
    lines = [ln for ln in out.splitlines() if ln.strip() and not re.match(r"^[A-Za-z0-9 ]+ \d+$", ln.strip())]
    text = " ".join(ln.strip() for ln in lines)
    text = re.sub(r"(^|\s)\d+\s", " ", text)  # verse numbers
    return re.sub(r"\s+", " ", text).strip()


def books(root: Path, spec) -> str:
    return "\n\n".join(chapter_text(root, b, c) for b, n in spec for c in range(1, n + 1)) + "\n"


def wordnet_items(root: Path) -> list[dict]:
    rng = random.Random(SEED)
    entries = []
    for line in (root / "usr/share/wordnet/data.noun").read_text(encoding="latin-1").splitlines():
        if line.startswith("  ") or "|" not in line:
            continue  # licence header
        head, gloss = line.split("|", 1)
        f = head.split()
        n_words = int(f[3], 16)
        words = [f[4 + 2 * i] for i in range(n_words)]
        word = words[0]
        definition = gloss.split(";")[0].strip()
        if not re.fullmatch(r"[a-z]{3,14}", word) or not (20 <= len(definition) <= 160):
            continue
        entries.append((word, definition))
    rng.shuffle(entries)
    vocab = sorted({w for w, _ in entries})
    items, seen = [], set()
    for word, definition in entries:
        if word in seen:
            continue
        seen.add(word)
        distractors = set()
        while len(distractors) < 3:
            d = rng.choice(vocab)
            if d != word and d not in definition:
                distractors.add(d)
        options = sorted(distractors) + [word]
        rng.shuffle(options)
        items.append({"definition": definition, "options": options, "answer": options.index(word)})
        if len(items) == N_TRAIN + N_HELDOUT:
            break
    return items


def _r_strings(blob: bytes) -> list:
    """The character vector in one R serialization (XDR, version 2 or 3) of a STRSXP."""
    if blob[:2] != b"X\n":
        raise ValueError("not an XDR R serialization")
    p = 2
    version = struct.unpack(">i", blob[p:p + 4])[0]
    p += 12  # version, writer's R version, minimal R version
    if version == 3:
        p += 4 + struct.unpack(">i", blob[p:p + 4])[0]  # native encoding
    flags, length = struct.unpack(">ii", blob[p:p + 8])
    if flags & 0xFF != 16:
        raise ValueError(f"not a character vector (SEXP type {flags & 0xFF})")
    p, out = p + 8, []
    for _ in range(length):
        _, n = struct.unpack(">ii", blob[p:p + 8])
        p += 8
        out.append("" if n < 0 else blob[p:p + n].decode("utf-8"))
        p += max(n, 0)
    return out


def austen_novels(root: Path) -> dict:
    """Each novel of janeaustenr's lazy-load database (zlib blocks, each an R character vector of
    lines), keyed by its first line (the title)."""
    raw, pos, novels = (root / AUSTEN_RDB).read_bytes(), 0, {}
    while pos < len(raw):
        d = zlib.decompressobj()
        lines = _r_strings(d.decompress(raw[pos + 4:]))  # 4 bytes: the uncompressed length
        novels[lines[0]] = lines
        pos = len(raw) - len(d.unused_data)
    return novels


def austen_chapters(lines: list) -> list:
    """The chapters of a novel, each a list of paragraphs (the wrapped lines joined)."""
    chapters, para = [], []
    for line in lines + [""]:
        if re.fullmatch(r"\s*chapter \d+\s*", line, re.IGNORECASE):
            chapters.append([])
        elif line.strip():
            para.append(line.strip())
        elif para:
            if chapters:  # the title page before chapter 1 is left out
                text = re.sub(r"\s+", " ", " ".join(para).replace("_", ""))
                chapters[-1].append(text)
            para = []
    return chapters


def austen_text(chapters: list) -> bytes:
    text = "\n\n".join("\n".join(paras) for paras in chapters) + "\n"
    return gzip.compress(text.encode("utf-8"), mtime=0)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as t:
        root = fetch(Path(t))
        (OUT / "kjv_train.txt").write_text(books(root, TRAIN_BOOKS))
        (OUT / "kjv_heldout.txt").write_text(books(root, HELDOUT_BOOKS))
        items = wordnet_items(root)
        for name, part in (("train", items[:N_TRAIN]), ("heldout", items[N_TRAIN:])):
            with open(OUT / f"wordnet_mc_{name}.jsonl", "w") as f:
                for it in part:
                    f.write(json.dumps(it) + "\n")
        novels = austen_novels(root)
        (OUT / "austen_train.txt.gz").write_bytes(austen_text(austen_chapters(novels[AUSTEN_TRAIN])))
        held = austen_chapters(novels[AUSTEN_HELDOUT])[:AUSTEN_HELDOUT_CHAPTERS]
        (OUT / "austen_heldout.txt.gz").write_bytes(austen_text(held))
        lic = (root / "usr/share/doc/wordnet-base/copyright").read_text()
        (OUT / "WORDNET_LICENSE.txt").write_text(lic)
    for p in sorted(OUT.iterdir()):
        print(f"{p.name}: {p.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
