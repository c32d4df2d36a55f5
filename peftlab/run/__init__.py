"""One experiment: the run folder, the training loop, evaluation, checkpoints and the run summary.

Depends on ``core`` and ``inputs``; never on ``study``.
"""
