"""What the planner sees, turned into what the model was trained on, as the contract says:
camera frames resized, laid out, typed and normalised (`CameraFeed`), and joint states kept
as they arrive so any history can be sampled (`StateHistory`)."""

from __future__ import annotations

import numpy as np

from runtime.model.contract import CameraInput

FIELDS = ("q", "dq", "effort", "q_cmd")


class ObservationError(ValueError):
    """An observation the contract cannot take (a frame of the wrong size, ...)."""


def _axis_map(src: int, dst: int, start: float, extent: float
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear sample positions: dst pixel centres over [start, start + extent) of src."""
    x = start + (np.arange(dst) + 0.5) * (extent / dst) - 0.5
    x = np.clip(x, 0.0, src - 1.0)
    i0 = np.floor(x).astype(np.intp)
    i1 = np.minimum(i0 + 1, src - 1)
    return i0, i1, (x - i0).astype(np.float32)


class CameraFeed:
    """One camera input of the contract: an RGB uint8 frame [h, w, 3] -> its tensor."""

    def __init__(self, spec: CameraInput, out: np.ndarray) -> None:
        self.spec = spec
        self.out = out  # the engine feed this fills, [batch, H, W, 3] or [batch, 3, H, W]
        self._maps: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}
        mean = np.asarray(spec.mean if spec.mean is not None else [0.0] * 3, np.float32)
        std = np.asarray(spec.std if spec.std is not None else [1.0] * 3, np.float32)
        self._mul = (spec.scale / std).astype(np.float32)  # (pixel * scale - mean) / std
        self._add = (-mean / std).astype(np.float32)

    def _map(self, h: int, w: int) -> tuple[np.ndarray, ...]:
        """Index maps from an h x w frame, built once per frame size."""
        key = (h, w)
        if key not in self._maps:
            s = self.spec
            y0, x0, ch, cw = 0.0, 0.0, float(h), float(w)
            if s.resize == "crop":  # the largest centred box with the model's aspect
                aspect = s.width / s.height
                if w / h > aspect:
                    cw = h * aspect
                    x0 = (w - cw) / 2
                else:
                    ch = w / aspect
                    y0 = (h - ch) / 2
            self._maps[key] = (*_axis_map(h, s.height, y0, ch), *_axis_map(w, s.width, x0, cw))
        return self._maps[key]

    def fill(self, image: np.ndarray, row: int = 0) -> None:
        s = self.spec
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ObservationError(f"camera {s.camera}: frame {image.dtype} "
                                   f"{' x '.join(map(str, image.shape))}, expected uint8 h x w x 3")
        h, w = image.shape[:2]
        if (h, w) == (s.height, s.width):
            img = image
        elif s.resize == "none":
            raise ObservationError(f"camera {s.camera} delivers {w}x{h}; input {s.name} takes "
                                   f"{s.width}x{s.height} with resize: none")
        else:
            y0, y1, wy, x0, x1, wx = self._map(h, w)
            src = image.astype(np.float32)
            rows = src[y0] * (1 - wy)[:, None, None] + src[y1] * wy[:, None, None]
            img = rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]
            if s.dtype == "uint8":
                img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        if s.layout == "NCHW":
            img = img.transpose(2, 0, 1)
        if s.dtype == "uint8":
            self.out[row] = img
        else:
            chan = (slice(None), None, None) if s.layout == "NCHW" else (None, None, slice(None))
            self.out[row] = img * self._mul[chan] + self._add[chan]


class StateHistory:
    """Joint states as the follower publishes them, in a bounded ring (oldest overwritten)."""

    def __init__(self, n_joints: int, capacity: int = 4096) -> None:
        self.t_ns = np.zeros(capacity, dtype=np.int64)
        self.values = {f: np.zeros((capacity, n_joints)) for f in FIELDS}
        self.count = 0
        self._cap = capacity

    def add(self, t_ns: int, **fields: np.ndarray) -> None:
        i = self.count % self._cap
        if self.count and t_ns < self.t_ns[(self.count - 1) % self._cap]:
            return  # out of order (a restarted follower's clock is the same clock: rare)
        self.t_ns[i] = t_ns
        for name, row in self.values.items():
            row[i] = fields.get(name, fields.get("q") if name == "q_cmd" else 0.0)
        self.count += 1

    def rows_at(self, times_ns: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The states `at` returns for these times, each once, oldest first: (read times
        [m], values [len(FIELDS), m, n]) -- all a reader of those times needs."""
        order = self._order()
        k = np.searchsorted(self.t_ns[order], np.asarray(times_ns), side="right") - 1
        picked = order[np.unique(np.maximum(k, 0))]
        return self.t_ns[picked].copy(), np.stack([self.values[f][picked] for f in FIELDS])

    def recent(self, t_ns: int, m: int) -> tuple[np.ndarray, np.ndarray]:
        """The newest `m` states read at or before t_ns, oldest first, as `rows_at` gives
        them (what a reader of any history up to that length needs)."""
        order = self._order()
        k = int(np.searchsorted(self.t_ns[order], t_ns, side="right"))
        picked = order[max(0, k - m):max(k, 1)]
        return self.t_ns[picked].copy(), np.stack([self.values[f][picked] for f in FIELDS])

    @property
    def latest_t_ns(self) -> int:
        return int(self.t_ns[(self.count - 1) % self._cap]) if self.count else 0

    def latest(self, field: str) -> np.ndarray:
        return self.values[field][(self.count - 1) % self._cap]

    def _order(self) -> np.ndarray:
        """Ring indices, oldest first."""
        n = min(self.count, self._cap)
        if n == 0:
            raise ObservationError("no joint state yet")
        end = self.count % self._cap
        return np.r_[end:self._cap, 0:end] if self.count > self._cap else np.arange(n)

    def at(self, field: str, t_ns: int) -> np.ndarray:
        """The newest state read at or before t_ns (the oldest kept, if none is)."""
        order = self._order()
        k = int(np.searchsorted(self.t_ns[order], t_ns, side="right")) - 1
        return self.values[field][order[max(k, 0)]]
