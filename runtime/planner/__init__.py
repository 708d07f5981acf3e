"""System 2 on the robot: the planner process (its shell and the sources of plans), the
model pipeline, observations (cameras, joint-state history) and the task store. Nothing here
imports the follower."""
