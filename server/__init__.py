"""gpupool daemon (`gpupool serve`): executes remote tensor ops on this host's GPUs, or fake ones, per session."""
