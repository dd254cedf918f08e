"""Tokenizers for the device: open_clip's CLIP BPE tokenizer re-implemented on numpy, and MiniLM's
WordPiece through the `tokenizers` package (only for bundles whose library embeds with MiniLM).

`ClipTokenizer` reproduces `open_clip.tokenizer.SimpleTokenizer` (clean="lower"): ftfy + double html
unescape, whitespace collapse, lower-case, the same regex, byte-level BPE with the merges from the
bundle's `bpe_simple_vocab_16e6.txt.gz`, <start_of_text> ... <end_of_text>, zero padding, truncation
to the context length with <end_of_text> last.
"""

from __future__ import annotations

import gzip
import html
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np
import regex  # not `re`: the CLIP pattern needs \p{L} and \p{N}

from .errors import MissingExtra

N_MERGES = 49152 - 256 - 2  # the merges CLIP uses from the vocab file
SPECIAL = ("<start_of_text>", "<end_of_text>")
PATTERN = regex.compile(r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
                        regex.IGNORECASE)

# What ftfy.fix_text changes in ordinary (not mis-decoded) text; used when ftfy is not installed.
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
                         "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"'})


def _fix_text_without_ftfy(text: str) -> str:
    text = text.translate(_QUOTES)
    # full-width forms and Latin ligatures -> their plain letters (ftfy's fix_character_width / fix_latin_ligatures)
    text = "".join(unicodedata.normalize("NFKC", c) if "\uff01" <= c <= "\uff5e" or c == "\u3000"
                   or "\ufb00" <= c <= "\ufb06" else c for c in text)
    text = "".join(c for c in text if c in "\t\n\r" or unicodedata.category(c) != "Cc")
    return unicodedata.normalize("NFC", text)


try:
    from ftfy import fix_text as _fix_text
except ImportError:  # ftfy is optional: only mis-decoded (mojibake) text tokenizes differently without it
    _fix_text = _fix_text_without_ftfy


def clean(text: str, fix_text=None) -> str:
    text = (fix_text or _fix_text)(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).strip().lower()


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class ClipTokenizer:
    def __init__(self, vocab_path: str | Path, context_length: int = 77, fix_text=None):
        with gzip.open(vocab_path) as f:
            lines = f.read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]
        byte_chars = list(bytes_to_unicode().values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + list(SPECIAL)
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.sot, self.eot = self.encoder[SPECIAL[0]], self.encoder[SPECIAL[1]]
        self.context_length = context_length
        self.fix_text = fix_text
        self.cache = {t: t for t in SPECIAL}

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):  # merge every occurrence of the best pair, left to right
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        byte_map = bytes_to_unicode()
        ids = []
        for token in PATTERN.findall(clean(text, self.fix_text)):
            token = "".join(byte_map[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids

    def __call__(self, texts: str | list[str]) -> np.ndarray:
        """int64 [N, context_length] token ids, as open_clip's tokenizer returns them."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in zip(out, texts):
            ids = [self.sot, *self.encode(text), self.eot]
            if len(ids) > self.context_length:
                ids = ids[:self.context_length]
                ids[-1] = self.eot
            row[:len(ids)] = ids
        return out


class WordPieceTokenizer:
    """MiniLM's tokenizer from the bundle's tokenizer.json (the `tokenizers` package, no transformers)."""

    def __init__(self, path: str | Path, max_length: int, pad_token: str = "[PAD]"):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise MissingExtra(f"this bundle's semantic encoder (MiniLM) needs the `tokenizers` package ({e}); "
                               f"install it with: pip install tokenizers") from e
        self.tokenizer = Tokenizer.from_file(str(path))
        self.max_length = max_length
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(pad_id=self.tokenizer.token_to_id(pad_token), pad_token=pad_token)

    def truncated(self, text: str) -> bool:
        return bool(self.tokenizer.encode(text).overflowing)

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        enc = self.tokenizer.encode_batch(list(texts))
        return {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64)}
