"""Watching a running robot without touching it: telemetry subscribers, `duet status` and
`duet top`, the flight recorder (MCAP), and the live Foxglove view."""
