"""`python -m policy.loop_report LOOP_DIR`: the data loop's outcome (`make data-loop`) as one
table and LOOP_DIR/summary.json: episodes recorded and exported, the fine-tune, and the
success rates before and after on held-out seeds."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def report(loop: Path) -> dict[str, Any]:
    info = _json(loop / "dataset/meta/info.json")
    train = _json(loop / "checkpoints/train-metrics.json")["planner"]
    recorded = len(list((loop / "recordings/episodes").glob("*.mcap")))
    rates = {}
    for name in ("before", "after", "before-then", "after-then"):
        path = loop / f"eval-{name}/eval.json"
        if path.is_file():
            s = _json(path)["runs"][0]["summary"]
            rates[name] = {"success_rate": s["success_rate"], "successes": s["successes"],
                           "episodes": s["episodes"], "wall_s": s["wall_s"]}
    return {"recorded_episodes": recorded, "dataset_episodes": info["total_episodes"],
            "dataset_frames": info["total_frames"], "fps": info["fps"],
            "finetune": {k: train.get(k) for k in ("steps", "sim_fraction", "recorded_frames",
                                                   "sim_scenes", "val_mae_rad_before",
                                                   "val_mae_rad", "seconds")},
            "eval": rates}


def main() -> int:
    loop = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/data-loop")
    summary = report(loop)
    (loop / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"data loop: {summary['recorded_episodes']} episodes recorded, "
          f"{summary['dataset_episodes']} exported ({summary['dataset_frames']} frames at "
          f"{summary['fps']} fps); fine-tune {summary['finetune']}")
    for name, r in summary["eval"].items():
        task = "'B after A'" if not name.endswith("then") else "'A, then B'"
        print(f"  {name.split('-')[0]:<7} {task:<12} success {r['success_rate']:.1%} "
              f"({r['successes']}/{r['episodes']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
