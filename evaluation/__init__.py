"""Closed-loop evaluation in MuJoCo: protocols, the harness, reference methods (random actions, CEM on the
true simulator), statistics, reports and planning videos."""
