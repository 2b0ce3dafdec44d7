"""Rebuilds ``corpus.txt`` from the Debian ``fortunes`` and ``fortunes-min`` packages.

This is a maintenance script, not part of the library: the corpus it writes is
shipped, so nothing is downloaded at run time. To rebuild it on a Debian system::

  mkdir /tmp/fortunes && cd /tmp/fortunes
  apt-get download fortunes fortunes-min
  for p in *.deb; do dpkg -x "$p" root; done
  python fdiv_jax/data/make_corpus.py \
      --src=/tmp/fortunes/root/usr/share/games/fortunes \
      --out=fdiv_jax/data/corpus.txt

Cleaning, per fortune (the text between two ``%`` lines):

* only the files in ``FILES`` (the inoffensive, mostly prose files; code,
  ASCII art, non-English and the sensitive topic files are left out);
* the attribution (the first indented line starting with ``--`` and all lines
  after it) is removed; backspace emphasis (``___\\bword``) and other control
  characters are removed;
* Unicode is folded to ASCII (NFKD, non-ASCII dropped); whitespace, newlines
  included, collapses to single spaces, so that one passage is one line;
* passages of fewer than ``MIN_CHARS`` or more than ``MAX_CHARS`` characters,
  or where letters, spaces and common punctuation make up less than 90% of the
  characters (tables, code, ASCII art), or that hold an e-mail or web address,
  are dropped; duplicates are dropped;
* the passages are shuffled with a fixed seed (so that a held-out split taken
  from the end of the file is not one topic).
"""

import argparse
import os
import random
import re
import unicodedata

FILES = (
    # fortunes-min
    "fortunes", "literature", "riddles",
    # fortunes
    "art", "cookie", "definitions", "education", "food", "goedel",
    "humorists", "kids", "law", "love", "magic", "medicine", "miscellaneous",
    "news", "paradoxum", "people", "pets", "platitudes", "pratchett",
    "science", "songs-poems", "sports", "startrek", "tao", "wisdom", "work",
    "zippy",
)
MIN_CHARS = 20
MAX_CHARS = 320
SEED = 0

_ATTRIBUTION = re.compile(r"^\s+--")
_OVERSTRIKE = re.compile(r"_*\x08+")  # underline-by-backspace emphasis
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_PROSE_CHARS = re.compile(r"[A-Za-z .,;:'\"!?()-]")


def _clean(fortune: str) -> str | None:
  """One cleaned passage, or ``None`` when the fortune is dropped."""
  lines = []
  for line in fortune.split("\n"):
    if _ATTRIBUTION.match(line) and lines:
      break
    lines.append(line)
  text = _CONTROL.sub("", _OVERSTRIKE.sub("", "\n".join(lines)))
  text = unicodedata.normalize("NFKD", text)
  text = text.encode("ascii", "ignore").decode("ascii")
  text = " ".join(text.split())
  if not MIN_CHARS <= len(text) <= MAX_CHARS:
    return None
  if len(_PROSE_CHARS.findall(text)) < 0.9 * len(text):
    return None
  if "@" in text or "://" in text:  # e-mail and web addresses
    return None
  return text


def build(src: str) -> list[str]:
  seen, passages = set(), []
  for name in FILES:
    with open(os.path.join(src, name), encoding="utf-8",
              errors="replace") as f:
      raw = f.read()
    for fortune in re.split(r"^%\s*$", raw, flags=re.MULTILINE):
      text = _clean(fortune)
      if text is not None and text not in seen:
        seen.add(text)
        passages.append(text)
  random.Random(SEED).shuffle(passages)
  return passages


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--src", required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  passages = build(args.src)
  with open(args.out, "w", encoding="ascii", newline="\n") as f:
    f.write("\n".join(passages) + "\n")
  print(f"{len(passages)} passages, {os.path.getsize(args.out)} bytes")


if __name__ == "__main__":
  main()
