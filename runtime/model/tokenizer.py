"""Word-level instruction tokenizer shared by training (policy/) and the planner process.

A fixed, small vocabulary: the planner only ever hears instructions like "touch the red
block" or "touch the blue block, then the green one". Ids are stable because they are baked
into the planner's embedding table; the tokenizer ships inside the bundle as tokenizer.json
so the runtime uses exactly the vocabulary the model was trained with. No torch here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

PAD_ID = 0
UNK_ID = 1
MAX_TOKENS = 16
FORMAT = "duet-word-tokenizer/1"

# Order matters: a word's id is its index + 2. Append only, never reorder.
DEFAULT_WORDS: tuple[str, ...] = (
    "touch", "tap", "reach", "go", "to", "move", "the", "a", "block", "blocks", "cube", "one",
    "then", "and", "after", "that", "first", "next", "finally", ",", ".",
    "red", "green", "blue", "yellow", "orange", "purple", "cyan", "magenta", "white", "black",
    "grey", "gray", "pink", "brown",
)

_WORD_RE = re.compile(r"[a-z]+|[,.]")


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used."""


class Tokenizer:
    """Lowercase word-level tokenizer: `encode(text) -> int64 [max_len]`, 0 = pad, 1 = unknown."""

    def __init__(self, words: tuple[str, ...] | list[str] = DEFAULT_WORDS,
                 max_len: int = MAX_TOKENS) -> None:
        words = tuple(words)
        if len(set(words)) != len(words):
            raise TokenizerError("vocabulary has duplicate words")
        if max_len <= 0:
            raise TokenizerError(f"max_len must be positive, got {max_len}")
        self.words = words
        self.max_len = max_len
        self._ids = {w: i + 2 for i, w in enumerate(words)}

    @property
    def vocab_size(self) -> int:
        """Size of the embedding table a model needs (pad + unknown + words)."""
        return len(self.words) + 2

    def split(self, text: str) -> list[str]:
        return _WORD_RE.findall(text.lower())

    def check(self, text: str, max_len: int | None = None) -> None:
        """Refuse text this closed vocabulary cannot represent, naming the unknown words,
        and text longer than the model's token budget."""
        words = self.split(text)
        unknown = sorted({w for w in words if w not in self._ids})
        if unknown:
            raise TokenizerError(f"unknown word(s) {', '.join(repr(w) for w in unknown)}: the "
                                 f"model knows {len(self.words)} words ({', '.join(self.words)})")
        limit = self.max_len if max_len is None else max_len
        if len(words) > limit:
            raise TokenizerError(f"{len(words)} tokens; the model reads at most {limit}")

    def ids(self, text: str) -> list[int]:
        return [self._ids.get(w, UNK_ID) for w in self.split(text)]

    def encode(self, text: str) -> np.ndarray:
        """Token ids, truncated or zero-padded to max_len."""
        ids = [self._ids.get(w, UNK_ID) for w in self.split(text)][: self.max_len]
        out = np.zeros(self.max_len, dtype=np.int64)
        out[: len(ids)] = ids
        return out

    def decode(self, ids: np.ndarray) -> str:
        inv = {i: w for w, i in self._ids.items()}
        return " ".join(inv.get(int(i), "<unk>") for i in ids if int(i) != PAD_ID)

    def to_dict(self) -> dict[str, object]:
        return {"format": FORMAT, "max_len": self.max_len, "pad_id": PAD_ID, "unk_id": UNK_ID,
                "words": list(self.words)}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise TokenizerError(f"{path}: cannot read tokenizer: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise TokenizerError(f"{path}: format is not {FORMAT!r}")
        if data.get("pad_id") != PAD_ID or data.get("unk_id") != UNK_ID:
            raise TokenizerError(f"{path}: pad_id/unk_id must be {PAD_ID}/{UNK_ID}")
        words, max_len = data.get("words"), data.get("max_len")
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise TokenizerError(f"{path}: words must be a list of strings")
        if not isinstance(max_len, int):
            raise TokenizerError(f"{path}: max_len must be an integer")
        return cls(words, max_len)


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON (BPE, WordPiece, WordLevel, Unigram) behind the same
    interface. Text it cannot represent -- tokens that map to the model's unknown token -- is
    refused naming the words, as with the word tokenizer."""

    def __init__(self, path: str | Path, max_len: int) -> None:
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError as exc:  # a robot dependency; named if an install lacks it
            raise TokenizerError("the `tokenizers` package is not installed") from exc
        try:
            self._tok = _HF.from_file(str(path))
        except Exception as exc:  # the Rust side raises its own exception type
            raise TokenizerError(f"{path}: not a Hugging Face tokenizers JSON: {exc}") from None
        self._tok.no_padding()
        self._tok.no_truncation()
        self.max_len = max_len
        unk = None
        try:
            unk = json.loads(Path(path).read_text()).get("model", {}).get("unk_token")
        except (OSError, ValueError, AttributeError):
            pass
        self._unk_id = self._tok.token_to_id(unk) if isinstance(unk, str) else None

    def ids(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())

    def check(self, text: str) -> None:
        enc = self._tok.encode(text)
        if self._unk_id is not None and self._unk_id in enc.ids:
            words = sorted({text[a:b] for i, (a, b) in zip(enc.ids, enc.offsets, strict=True)
                            if i == self._unk_id})
            raise TokenizerError(f"unknown word(s) {', '.join(repr(w) for w in words)}: not in "
                                 "the model's tokenizer vocabulary")
        if len(enc.ids) > self.max_len:
            raise TokenizerError(f"{len(enc.ids)} tokens; the model reads at most {self.max_len}")


class InstructionEncoder:
    """The contract's instruction input: text -> ids (and mask) padded as the model wants."""

    def __init__(self, kind: str, path: str | Path, max_len: int, padding_side: str = "right",
                 pad_id: int = 0) -> None:
        self.max_len, self.left, self.pad_id = max_len, padding_side == "left", pad_id
        self._words: Tokenizer | None = None
        self._hf: HFTokenizer | None = None
        if kind == "hf-tokenizers":
            self._hf = HFTokenizer(path, max_len)
        else:
            self._words = Tokenizer.load(path)

    def vocab_size(self) -> int:
        tok = self._hf if self._hf is not None else self._words
        assert tok is not None
        return tok.vocab_size

    def check(self, text: str) -> None:
        if self._hf is not None:
            self._hf.check(text)
            return
        assert self._words is not None
        self._words.check(text, self.max_len)

    def encode(self, text: str, ids_out: np.ndarray, mask_out: np.ndarray | None = None) -> None:
        """Fill ids_out [max_len] (and mask_out, 1 = token) for `text`."""
        tok = self._hf if self._hf is not None else self._words
        assert tok is not None
        ids = tok.ids(text)[: self.max_len]
        n = len(ids)
        ids_out.fill(self.pad_id)
        at = slice(self.max_len - n, self.max_len) if self.left else slice(0, n)
        ids_out[at] = ids
        if mask_out is not None:
            mask_out.fill(0)
            mask_out[at] = 1
