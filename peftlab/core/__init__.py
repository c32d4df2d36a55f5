"""What is adapted and how: the model map, placement, rank schedules, the methods and export.

Model surgery only: nothing here reads a run folder, a dataset or a config file. It depends on
``peftlab.errors`` and ``peftlab.config`` and nothing above them.
"""
