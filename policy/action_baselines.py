"""Fixed-rate action-chunk tokenizers to compare FACT against, at the same number of bits.

Both work on chunks of deltas from the observed q, [N, H, J] in rad, fit their statistics on
training chunks and round-trip (`roundtrip`) held-out chunks through a code of exactly `bits`
bits:

- `UniformBinning`: every one of the H*J values clipped to its 0.5-99.5 % training quantiles
  and cut into the same number of equal bins, floor(2 ** (bits / (H*J))) (RT-2's
  per-dimension binning, at a bit budget instead of 256 bins per value);
- `DctQuantizer`: FAST-style, a per-joint DCT-II over time, then each coefficient quantized
  uniformly over its training range (FAST does not clip); the bits go greedily, one at a
  time, to the coefficient whose extra bit lowers the training error most (a fixed-rate
  allocation: FAST rounds with one scale and entropy-codes with BPE instead, which gives a
  variable length).

Both decode a bin to the mean of the training values in it, not its centre: never worse.
"""

from __future__ import annotations

import numpy as np

BINNING_QUANTILE = 0.005  # clipped tails: 0.5 % each side (binning is worse without)


class _UniformQuantizer:
    """Per column: `levels` equal bins between the training values' `quantile` and
    1 - `quantile` (values beyond go to the end bins), each decoded to the mean of the
    training values that fell into it (an empty bin: its centre). Doubling the levels
    splits every bin, so an extra bit never raises the training error."""

    def __init__(self, train: np.ndarray, levels: np.ndarray, quantile: float = 0.0) -> None:
        self.lo, hi = np.quantile(train, [quantile, 1.0 - quantile], axis=0)
        self.levels = np.asarray(levels, dtype=int)
        self.width = np.maximum(hi - self.lo, 1e-9) / self.levels
        idx = self.index(train)
        self.table = np.zeros((int(self.levels.max()), train.shape[1]))
        for col in range(train.shape[1]):
            n = self.levels[col]
            total = np.bincount(idx[:, col], weights=train[:, col], minlength=n)
            count = np.bincount(idx[:, col], minlength=n)
            centre = self.lo[col] + (np.arange(n) + 0.5) * self.width[col]
            self.table[:n, col] = np.where(count > 0, total / np.maximum(count, 1), centre)

    def index(self, x: np.ndarray) -> np.ndarray:
        return np.clip(np.floor((x - self.lo) / self.width), 0, self.levels - 1).astype(int)

    def roundtrip(self, x: np.ndarray) -> np.ndarray:
        return np.take_along_axis(self.table, self.index(x), axis=0)


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix [n, n] (row k = frequency k); its transpose inverts it."""
    k, h = np.arange(n)[:, None], np.arange(n)[None, :]
    m = np.cos(np.pi * (h + 0.5) * k / n) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


class UniformBinning:
    """Equal bins per value: `bits` bits spread over all H*J values."""

    def __init__(self, bits: int) -> None:
        self.bits = bits

    def fit(self, chunks: np.ndarray) -> UniformBinning:
        flat = chunks.reshape(len(chunks), -1)
        levels = int(np.floor(2.0 ** (self.bits / flat.shape[1]) + 1e-9))
        self.quantizer = _UniformQuantizer(flat, np.full(flat.shape[1], levels),
                                           BINNING_QUANTILE)
        return self

    def roundtrip(self, chunks: np.ndarray) -> np.ndarray:
        return self.quantizer.roundtrip(chunks.reshape(len(chunks), -1)).reshape(chunks.shape)


class DctQuantizer:
    """DCT per joint over the chunk's time axis, `bits` bits allocated greedily over the
    H*J coefficients."""

    def __init__(self, bits: int) -> None:
        self.bits = bits

    @staticmethod
    def coefficients(chunks: np.ndarray) -> np.ndarray:
        """[N,H,J] -> orthonormal DCT-II along H, flattened [N, H*J] (its error in rad^2
        equals the chunk's)."""
        return np.einsum("kh,nhj->nkj", dct_matrix(chunks.shape[1]), chunks).reshape(
            len(chunks), -1)

    def fit(self, chunks: np.ndarray, max_samples: int = 20000, seed: int = 0
            ) -> DctQuantizer:
        """Allocate the bits on (a seeded sample of at most `max_samples` of) the chunks."""
        pick = np.random.default_rng(seed).permutation(len(chunks))[:max_samples]
        coef = self.coefficients(chunks[np.sort(pick)])
        bits = np.zeros(coef.shape[1], dtype=int)

        def errors(b: np.ndarray) -> np.ndarray:  # per-coefficient training MSE at bits b
            return ((_UniformQuantizer(coef, 2 ** b).roundtrip(coef) - coef) ** 2).mean(0)

        current = errors(bits)
        for _ in range(self.bits):
            finer = errors(bits + 1)
            best = int(np.argmax(current - finer))
            bits[best] += 1
            current[best] = finer[best]
        self.coef_bits = bits
        self.quantizer = _UniformQuantizer(coef, 2 ** bits)
        return self

    def roundtrip(self, chunks: np.ndarray) -> np.ndarray:
        q = self.quantizer.roundtrip(self.coefficients(chunks)).reshape(chunks.shape)
        return np.einsum("kh,nkj->nhj", dct_matrix(chunks.shape[1]), q)
