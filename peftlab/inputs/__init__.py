"""Where models and data come from: the embedded assets, model loading and its cache, the task data.

Depends on ``peftlab.core`` (the model map, to split new weights) and never on ``run`` or ``study``.
Its modules never print: they log through ``logging.getLogger(__name__)`` under the "peftlab" logger,
and the CLI or the run decides where the lines go (``peftlab.messages``).
"""
