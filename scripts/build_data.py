"""Rebuild the default data shipped in python/seft_ext/data/ from Debian packages.

    python scripts/build_data.py            # needs apt-get (Debian / Ubuntu); writes the files

- kjv_train.txt / kjv_heldout.txt: the King James Bible (1611, public domain) from the
  packages bible-kjv-text + bible-kjv (its `bible` reader): Genesis and Exodus for
  training, Ruth, Esther and Jonah held out. Verse numbers and chapter headings removed;
  one chapter per paragraph.
- wordnet_mc_{train,heldout}.jsonl: "which word is defined" 4-way multiple choice from
  WordNet 3.0 nouns (package wordnet-base): the gloss of a noun synset with a one-word
  lemma, the lemma, and 3 one-word lemmas of other random synsets. Fixed seed.
"""
from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "python" / "seft_ext" / "data"
TRAIN_BOOKS = [("gen", 50), ("exo", 40)]
HELDOUT_BOOKS = [("ruth", 4), ("esth", 10), ("jonah", 4)]
N_TRAIN, N_HELDOUT, SEED = 2000, 500, 0


def fetch(tmp: Path) -> Path:
    subprocess.run(["apt-get", "download", "bible-kjv-text", "bible-kjv", "wordnet-base"], cwd=tmp, check=True,
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
        lic = (root / "usr/share/doc/wordnet-base/copyright").read_text()
        (OUT / "WORDNET_LICENSE.txt").write_text(lic)
    for p in sorted(OUT.iterdir()):
        print(f"{p.name}: {p.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
