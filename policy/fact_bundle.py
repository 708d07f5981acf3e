"""The FACT planner as `duet export` takes any model: a factory over the folder `duet
train-fact` writes, and the contract it fills from policy/fact_contract.yaml.

    duet export --module policy.fact_bundle:modules --checkpoint runs/fact \
        --contract runs/fact/fact_contract.yaml --assets runs/fact --out bundles/fact

Stage `codes` (`CodesStage`) is the planner with the runtime's prefix converted back to the
absolute waypoints it was trained on; stage `decoder` is `policy.fact.FactDecoderStage`, the
x-prediction turned into the velocity the runtime integrates. The integrated x is the chunk
in the tokenizer's normalised space: the contract's `actions.mean/std` are the tokenizer's,
so the runtime's de-normalisation is the tokenizer's own.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from policy.fact import FactDecoderStage, FactTokenizer
from policy.fact_planner import FactPlanner
from policy.models import Follower, load_checkpoint
from runtime.model.tokenizer import Tokenizer

TEMPLATE = Path(__file__).with_name("fact_contract.yaml")
CONTRACT = "fact_contract.yaml"  # the filled copy, in the checkpoint folder


class CodesStage(nn.Module):
    """(image, tokens, q, prefix, prefix_len) -> codes [1,L,Bits] of +-1, where prefix is
    what the runtime feeds: normalised deltas from q, (a - q - mean) / std."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, planner: FactPlanner, tokenizer: FactTokenizer) -> None:
        super().__init__()
        self.planner = planner
        self.register_buffer("mean", tokenizer.mean.detach().clone())
        self.register_buffer("std", tokenizer.std.detach().clone())

    def forward(self, image: torch.Tensor, tokens: torch.Tensor, q: torch.Tensor,
                prefix: torch.Tensor, prefix_len: torch.Tensor) -> torch.Tensor:
        absolute = q[:, None, :] + prefix * self.std + self.mean
        return self.planner(image, tokens, q, absolute, prefix_len)


def _load(path: Path, cls: type[nn.Module]) -> Any:
    model, _ = load_checkpoint(path)
    if not isinstance(model, cls):
        raise ValueError(f"{path}: a {type(model).__name__} checkpoint, expected {cls.__name__}")
    return model


def modules(checkpoint: str | Path) -> dict[str, nn.Module]:
    """The bundle's three models from a `duet train-fact` folder."""
    folder = Path(checkpoint)
    tokenizer = _load(folder / "fact_tokenizer.pt", FactTokenizer)
    planner = _load(folder / "fact_planner.pt", FactPlanner)
    return {"codes": CodesStage(planner, tokenizer), "decoder": FactDecoderStage(tokenizer),
            "follower": _load(folder / "follower.pt", Follower)}


def contract_data(tokenizer: FactTokenizer, planner: FactPlanner, joints: list[str],
                  rates: dict[str, float] | None = None) -> dict[str, Any]:
    """The template with this robot's joints (and rates), this training's code shape, prefix
    length and delta statistics."""
    mine = (tokenizer.code_len, tokenizer.code_bits, tokenizer.horizon)
    theirs = (planner.code_len, planner.code_bits, planner.horizon)
    if mine != theirs:
        raise ValueError(f"the planner predicts codes (length, bits, horizon) {theirs}, the "
                         f"tokenizer decodes {mine}")
    data = yaml.safe_load(TEMPLATE.read_text())
    codes = data["planner"]["stages"][0]
    next(i for i in codes["inputs"] if i["role"] == "prefix")["steps"] = planner.prefix_max
    codes["outputs"][0]["shape"] = [1, tokenizer.code_len, tokenizer.code_bits]
    if len(joints) != len(tokenizer.mean):
        raise ValueError(f"{len(joints)} joints, but the tokenizer was trained on "
                         f"{len(tokenizer.mean)}")
    if rates is not None:
        data["rates"] = rates
    actions = data["planner"]["actions"]
    actions["joints"] = list(joints)
    actions["horizon"] = tokenizer.horizon
    actions["mean"] = [float(v) for v in tokenizer.mean]
    actions["std"] = [float(v) for v in tokenizer.std]
    return data


def write_export_folder(out_dir: Path, tokenizer: FactTokenizer, planner: FactPlanner,
                        vocab: Tokenizer, follower: Path | None, joints: list[str],
                        rates: dict[str, float] | None = None) -> None:
    """Everything `duet export` needs beside the two checkpoints: the filled contract, the
    instruction tokenizer and the follower (the reference one, `duet train`'s)."""
    header = (f"# Written by duet train-fact from {TEMPLATE.name}: the robot's joints, the "
              "tokenizer's statistics and code shape filled in.\n")
    contract = contract_data(tokenizer, planner, joints, rates)
    (out_dir / CONTRACT).write_text(header + yaml.safe_dump(
        contract, sort_keys=False, default_flow_style=None, width=100))
    vocab.save(out_dir / "tokenizer.json")
    if follower is not None:
        shutil.copyfile(follower, out_dir / "follower.pt")
