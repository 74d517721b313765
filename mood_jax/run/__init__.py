"""One run of a workdir: the pipeline over the stages, the dry run, the one-class protocol,
the workdir lock, the run's config.json, and the allocator check."""
