"""The reference pair as `duet export` takes any model: a factory the exporter calls with the
checkpoint folder `duet train` wrote (planner.pt, follower.pt, tokenizer.json, calib.npz),
and the contract in reference_contract.yaml."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from policy.models import load_checkpoint

CONTRACT = Path(__file__).with_name("reference_contract.yaml")


def modules(checkpoint: str | Path) -> dict[str, nn.Module]:
    folder = Path(checkpoint)
    return {name: load_checkpoint(folder / f"{name}.pt")[0] for name in ("planner", "follower")}
