"""duet's onboard runtime, in rooms by role; each imports only the rooms below it (the layers
contract in pyproject.toml): commands > deploy > observe | stack > remote > follower | planner
> model > ipc > config. See docs/architecture.md."""
