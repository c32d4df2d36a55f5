"""Where models and data come from: the embedded assets, model loading and its cache, the task data.

Depends on ``peftlab.core`` (the model map, to split new weights) and never on ``run`` or ``study``.
"""
