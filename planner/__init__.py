"""Cost model and planner: measure nodes (``probe``), predict speed and choose a split (``model``, ``plan``)."""
