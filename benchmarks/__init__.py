"""Measured speeds and planning quality, each beside a baseline timed in the same run (``wm bench``):
collection and loading, training throughput, planning time (with the naive references), and closed-loop
success against planning time."""
