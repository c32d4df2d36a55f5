"""Many experiments: sweep files, executors, paired statistics, verdicts, the report and its figures.

Depends on ``run`` (one trial is one run) and everything below it; only ``peftlab.cli`` sits above.
"""
