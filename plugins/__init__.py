"""fewstep's built-in plugins. Each module registers through the ``fewstep`` entry-point group,
exactly like a third-party plugin."""
