"""System 1, the real-time follower: the pure core (safety state machine, tracking, the
command filter) and the process shell around it (bus, sockets, deadlines). The core imports no
I/O; nothing here imports the planner."""
