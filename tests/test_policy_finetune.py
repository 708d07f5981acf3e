"""The hindsight target order that fine-tuning reads back from demonstrations."""

from __future__ import annotations

import numpy as np
import torch

from policy.finetune import demonstrated_order
from policy.models import Planner


def test_demonstrated_order_recovers_the_blocks_the_arm_went_to() -> None:
    torch.manual_seed(0)
    model = Planner(vocab_size=40).eval()
    g = torch.Generator().manual_seed(1)
    n = 30
    images = torch.randint(0, 256, (2 * n, 96, 96, 3), dtype=torch.uint8, generator=g)
    q = torch.randn(2 * n, 6, generator=g) * 0.3
    with torch.no_grad():
        xy, _ = model.vision(images)
        # episode 0 heads for block 2, then block 0; episode 1 for block 3 only
        goes_to = [2] * 12 + [0] * 18 + [3] * n
        chunk = torch.stack([model.act(xy[i:i + 1, c], q[i:i + 1])[0]
                             for i, c in enumerate(goes_to)])
    episode = np.array([0] * n + [1] * n)
    order = demonstrated_order(model, {"image": images, "q": q, "chunk": chunk}, episode)
    assert order.shape == (2 * n, 2) and order.dtype == np.int64
    assert (order[:n] == [2, 0]).all()
    assert (order[n:] == [3, -1]).all()  # one target shown: no second label
