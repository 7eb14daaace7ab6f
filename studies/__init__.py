"""Studies: measurements that answer a question about the model or the planner, each from one command
(``wm study``), on validation episodes unless said otherwise."""
