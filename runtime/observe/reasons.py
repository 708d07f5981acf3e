"""Long reasons, summarised for a screen. A bus read that failed for six motors names each
one ("sync read: no reply within 5 ms from shoulder_pan (id 1); no reply within 5 ms from
..."): at 80 columns that is a dozen rows. Here it says so once: "sync read: 6 motors: no
reply within 5 ms (shoulder_pan, shoulder_lift, ...)". The JSON of `duet status` keeps the
reason as the follower gave it."""

from __future__ import annotations

import re

# one motor's clause, as the serial-servo drivers word it: "WHAT from NAME (id N)"
_PER_MOTOR = re.compile(r"^(?P<what>.+?) from (?P<who>[^\s;()]+)(?: \(id \d+\))?$")


def summarize(reason: str) -> str:
    """Per-motor clauses grouped by what went wrong; any other reason as it is."""
    clauses = reason.split("; ")
    if len(clauses) < 2:
        return reason
    head, _, clauses[0] = clauses[0].rpartition(": ")  # the context, e.g. "bus: sync read"
    grouped: dict[str, list[str]] = {}
    for clause in clauses:
        found = _PER_MOTOR.match(clause)
        if found is None:
            return reason
        grouped.setdefault(found["what"], []).append(found["who"])
    body = "; ".join(f"{len(who)} motors: {what} ({', '.join(who)})" if len(who) > 1
                     else f"{who[0]}: {what}" for what, who in grouped.items())
    return f"{head}: {body}" if head else body

