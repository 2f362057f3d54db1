"""Running evaluations: a run's identity (`identity`), the compute pipeline (`pipeline`), finishing
(`finish`: summaries, tables), `eval` itself, and beside them the run-folder files (`files`), sharding,
the heatmap cache, `rescore`, the threshold search, progress bars and provenance."""
