"""runtime.model.tokenizer: fixed word-level vocabulary, padding, unknowns, round trip as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from runtime.model.tokenizer import MAX_TOKENS, PAD_ID, UNK_ID, Tokenizer, TokenizerError


def test_encode_two_step_instruction() -> None:
    tok = Tokenizer()
    ids = tok.encode("Touch the BLUE block, then the green one")
    assert ids.dtype == np.int64 and ids.shape == (MAX_TOKENS,)
    words = ["touch", "the", "blue", "block", ",", "then", "the", "green", "one"]
    assert tok.split("Touch the BLUE block, then the green one") == words
    assert (ids[: len(words)] > UNK_ID).all()
    assert (ids[len(words):] == PAD_ID).all()
    assert tok.decode(ids) == " ".join(words)
    # colours must map to distinct ids: that is the whole task
    colours = [int(tok.encode(c)[0]) for c in ("red", "green", "blue", "yellow")]
    assert len(set(colours)) == 4


def test_unknown_words_and_truncation() -> None:
    tok = Tokenizer()
    ids = tok.encode("touch the chartreuse block")
    assert ids[2] == UNK_ID and ids[0] > UNK_ID
    long = tok.encode(" ".join(["touch"] * 40))
    assert long.shape == (MAX_TOKENS,) and (long == long[0]).all()
    assert (tok.encode("") == PAD_ID).all()


def test_save_load_round_trip(tmp_path: Path) -> None:
    tok = Tokenizer()
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    back = Tokenizer.load(path)
    text = "touch the red block, then the yellow one"
    assert np.array_equal(back.encode(text), tok.encode(text))
    assert back.vocab_size == tok.vocab_size


def test_load_rejects_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read"):
        Tokenizer.load(path)
    data = Tokenizer().to_dict()
    data["format"] = "other/1"
    path.write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="format"):
        Tokenizer.load(path)
    with pytest.raises(TokenizerError, match="duplicate"):
        Tokenizer(["red", "red"])
