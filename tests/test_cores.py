"""One follower per core on a host: the configured core when free, a free one when another
stack's follower has it, shared (and said so) when every core is taken; a claim made by
`duet run` for its follower is the follower's own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.follower.cores import claim_core

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def two_cpus() -> list[int]:
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs two cores")
    return allowed[-2:]


def test_a_second_follower_takes_a_free_core_then_shares(tmp_path: Path,
                                                         two_cpus: list[int]) -> None:
    preferred = two_cpus[-1]
    first = claim_core(preferred, tmp_path)
    assert (first.cpu, first.report) == (preferred, None) and first.lock is not None
    assert (tmp_path / f"duet-cpu{preferred}.lock").read_text() == f"{os.getpid()}\n"
    others = [claim_core(preferred, tmp_path) for _ in range(len(os.sched_getaffinity(0)) - 1)]
    assert sorted({c.cpu for c in others} | {preferred}) == sorted(os.sched_getaffinity(0))
    assert others[0].report == (f"cpu {preferred} is the follower core of pid {os.getpid()} "
                                f"(another stack): this follower takes cpu {others[0].cpu}")
    shared = claim_core(preferred, tmp_path)  # every core has a follower
    assert (shared.cpu, shared.lock) == (preferred, None)
    assert shared.report == (f"every core has a follower already: sharing cpu {preferred} "
                             f"with pid {os.getpid()}")
    first.release()
    again = claim_core(preferred, tmp_path)
    assert (again.cpu, again.report) == (preferred, None)
    for claim in (again, *others):
        claim.release()
    assert claim_core(None, tmp_path).cpu is None  # no pinning asked: nothing claimed


def test_the_claim_of_the_parent_is_the_followers(tmp_path: Path, two_cpus: list[int]) -> None:
    preferred = two_cpus[-1]
    parent = claim_core(preferred, tmp_path)  # as `duet run` does before it starts the follower
    code = ("import sys; from pathlib import Path\n"
            "from runtime.follower.cores import claim_core\n"
            f"c = claim_core({preferred}, Path(sys.argv[1])); print(c.cpu, c.lock, c.report)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.stdout.split() == [str(preferred), "None", "None"], done.stderr
    parent.release()
