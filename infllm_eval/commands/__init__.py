"""The commands built on the core (config, models, engine, methods, tasks, store, runner): each reads runs or
configs and never changes how a run computes. `report` (tidy tables, paper tables, plots), `check` (the regression
gate), `plan` (a dry run: samples, tokens, memory), `merge` (shards into one run), `score` (rescoring without a
model), `bench` (speed and memory), `data` (download and make benchmark files)."""
