"""Studies: measurements that answer a question about the model or the planner, each from one command
(``wm study``), on validation episodes unless said otherwise."""

# What a study says of kept parts measured with other settings (``common.files.KeptRuns``)
STUDY_ADVICE = "give another --out, or delete its units directory to measure everything again"
