"""Action tokens <-> an action chunk [H, D] in the model's action space (before the contract's
de-normalisation), for autoregressive heads (a loop stage's `detokenizer`). One class per
kind behind one name table, each with `decode` (the runtime's direction) and `encode` (what a
trainer tokenizes its chunks with, and what tests check the round trip against):

- `bins`: uniform bins per dimension, time-major tokens (RT-2, OpenVLA);
- `fast`: FAST -- per-dimension DCT of the chunk, scaled and rounded, flattened lowest
  frequency first (every joint's coefficient 0, then every joint's 1, ...), then BPE over
  those integer symbols; its BPE is a Hugging Face `tokenizers` file in the bundle, trained
  with `train_fast_bpe`. numpy and `tokenizers` only (robot code).

A decode never raises on the tokens a model produced: out-of-range bins are clipped, a short
sequence ends in the last complete step held (bins) or in zero high-frequency coefficients
(fast, the smooth part is first); only a sequence with no complete step at all is refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import numpy as np

from runtime.model.contract import BinsDetokenizer, Detokenizer, FastDetokenizer

# FAST symbol s is the character chr(FAST_BASE + s - min_symbol): the CJK block, letters all,
# so no normaliser or pre-tokenizer of a BPE splits or drops one.
FAST_BASE = 0x4E00


class DetokenizeError(ValueError):
    """Tokens that make no chunk (not one complete step); the message says why."""


class ChunkCodec(Protocol):
    def decode(self, tokens: np.ndarray, out: np.ndarray) -> None:
        """The model's tokens (int64, up to the end token) -> the chunk into `out` [H, D]."""
        ...

    def encode(self, chunk: np.ndarray) -> list[int]:
        """A chunk [H, D] -> the model's tokens."""
        ...


class BinsCodec:
    def __init__(self, spec: BinsDetokenizer) -> None:
        self.spec = spec
        self.low = np.asarray(spec.low)
        self.width = (np.asarray(spec.high) - self.low) / spec.bins

    def encode(self, chunk: np.ndarray) -> list[int]:
        b = np.floor((chunk - self.low) / self.width).astype(np.int64)
        return (np.clip(b, 0, self.spec.bins - 1) + self.spec.token_offset).ravel().tolist()

    def decode(self, tokens: np.ndarray, out: np.ndarray) -> None:
        h, d = out.shape
        steps = min(len(tokens) // d, h)
        if steps == 0:
            raise DetokenizeError(f"{len(tokens)} tokens: not one step of {d} joints")
        b = np.clip(tokens[:steps * d] - self.spec.token_offset, 0, self.spec.bins - 1)
        out[:steps] = self.low + (b.reshape(steps, d) + 0.5) * self.width
        out[steps:] = out[steps - 1]  # a short chunk holds its last step


def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II [n, n]: X = C @ x (per column); its inverse is C.T."""
    k = np.arange(n)[:, None]
    c = np.sqrt(2.0 / n) * np.cos(np.pi * (np.arange(n)[None, :] + 0.5) * k / n)
    c[0] /= np.sqrt(2.0)
    return c


class FastCodec:
    def __init__(self, spec: FastDetokenizer, tokenizer_path: Path, horizon: int) -> None:
        from tokenizers import Tokenizer

        self.spec = spec
        self.bpe = Tokenizer.from_file(str(tokenizer_path))
        self.vocab = self.bpe.get_vocab_size()
        self.dct = dct_matrix(horizon)

    def symbols(self, chunk: np.ndarray) -> np.ndarray:
        """The rounded, scaled DCT coefficients, lowest frequency first (the BPE's input)."""
        return np.rint(self.dct @ chunk * self.spec.scale).astype(np.int64).ravel()

    def encode(self, chunk: np.ndarray) -> list[int]:
        text = symbols_text(self.symbols(chunk), self.spec.min_symbol)
        return [i + self.spec.token_offset for i in self.bpe.encode(text).ids]

    def decode(self, tokens: np.ndarray, out: np.ndarray) -> None:
        h, d = out.shape
        ids = tokens - self.spec.token_offset
        pieces = [self.bpe.id_to_token(int(i)) for i in ids if 0 <= i < self.vocab]
        chars = "".join(p for p in pieces if p is not None)
        sym = np.fromiter((ord(c) - FAST_BASE + self.spec.min_symbol for c in chars),
                          dtype=np.float64, count=len(chars))[:h * d]
        if sym.size < d:
            raise DetokenizeError(f"{len(tokens)} tokens decode to {sym.size} coefficients: "
                                  f"not even the lowest frequency of {d} joints")
        coef = np.zeros(h * d)
        coef[:sym.size] = sym
        out[:] = self.dct.T @ (coef.reshape(h, d) / self.spec.scale)


def symbols_text(symbols: Iterable[int], min_symbol: int) -> str:
    return "".join(chr(FAST_BASE + max(int(s) - min_symbol, 0)) for s in symbols)


def make_codec(spec: Detokenizer, bundle_path: Path, horizon: int) -> ChunkCodec:
    if isinstance(spec, BinsDetokenizer):
        return BinsCodec(spec)
    return FastCodec(spec, bundle_path / spec.tokenizer, horizon)


def train_fast_bpe(chunks: np.ndarray, scale: float, vocab_size: int, path: Path) -> int:
    """Fit FAST's BPE on chunks [N, H, D] (the model's action space) and save it at `path`;
    returns the `min_symbol` the contract's detokenizer states."""
    from tokenizers import Tokenizer, models, trainers

    dct = dct_matrix(chunks.shape[1])
    symbols = [np.rint(dct @ c * scale).astype(np.int64).ravel() for c in chunks]
    low = int(min(s.min() for s in symbols))
    high = int(max(s.max() for s in symbols))
    alphabet = [chr(FAST_BASE + k) for k in range(high - low + 1)]
    bpe = Tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=max(vocab_size, len(alphabet)),
                                  initial_alphabet=alphabet, show_progress=False,
                                  max_token_length=64)
    bpe.train_from_iterator((symbols_text(s, low) for s in symbols), trainer)
    bpe.save(str(path))
    return low
