"""Putting duet on a robot and keeping it there: install and uninstall, the offline
archive, the virtual environment, the bundle store, config edits over SSH with their journal,
Jetson checks, start-time preflight and `duet doctor`."""
