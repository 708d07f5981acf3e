"""The planner off the robot: the planner server (CURVE over TCP, batching, the Ray
backend), the robot's relay to it, and the wire between them."""
