"""Searches that run the pass repeatedly and measure each trial: sensitivity probes, the --max-error search."""
