"""Research probes: one-off measurements of the methods' memory, time and lookups (see probes/README.md).

Run them as modules from the repository root, e.g. `.venv/bin/python -m probes.time_parts 8192`."""
