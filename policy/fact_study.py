"""Reconstruction error against code length: FACT vs uniform binning vs DCT, at equal bits.

For each code length L (codes of `code_bits` bits, so L * code_bits bits in all) a FACT
tokenizer is trained on the training chunks and the two baselines are fitted on the same
chunks at the same number of bits; each round-trips the held-out sets. FACT decodes with K
Euler steps for every K asked (fixed noise seed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from policy.action_baselines import DctQuantizer, UniformBinning
from policy.fact import fact_roundtrip, reconstruction_error, train_tokenizer
from policy.train import Log


def study(train: np.ndarray, tests: dict[str, np.ndarray], code_lens: Sequence[int],
          code_bits: int, steps: int, seed: int, decoder_steps: Sequence[int],
          log: Log = print, **tokenizer_kwargs: Any) -> list[dict[str, Any]]:
    """One row per (code length, test set): errors in rad of every method."""
    rows: list[dict[str, Any]] = []
    for code_len in code_lens:
        bits = code_len * code_bits
        model = train_tokenizer(train, steps, seed, code_len=code_len, code_bits=code_bits,
                                log=log, **tokenizer_kwargs)
        binning = UniformBinning(bits).fit(train)
        dct = DctQuantizer(bits).fit(train)
        for name, test in tests.items():
            row: dict[str, Any] = {
                "test": name, "quantizer": model.quantizer, "code_len": code_len,
                "code_bits": code_bits, "bits": bits,
                "chunks": len(test),
                "uniform_binning": reconstruction_error(binning.roundtrip, test),
                "dct": reconstruction_error(dct.roundtrip, test),
                "fact": {str(k): reconstruction_error(fact_roundtrip(model, k, seed), test)
                         for k in decoder_steps}}
            rows.append(row)
            log(format_rows([row]).splitlines()[-1])
    return rows


def format_rows(rows: list[dict[str, Any]], metric: str = "rmse_rad") -> str:
    """Markdown table of `study` rows (errors in mrad)."""
    ks = list(rows[0]["fact"]) if rows else []
    head = (["held-out set", "FACT bits", "L", "bits", "uniform binning", "DCT"]
            + [f"FACT K={k}" for k in ks] + ["FACT (best K) / binning"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        fact = [r["fact"][k][metric] for k in ks]
        cells = [r["test"], r["quantizer"], str(r["code_len"]), str(r["bits"]),
                 f"{r['uniform_binning'][metric] * 1e3:.2f}", f"{r['dct'][metric] * 1e3:.2f}"]
        cells += [f"{v * 1e3:.2f}" for v in fact]
        cells.append(f"{min(fact) / r['uniform_binning'][metric]:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
