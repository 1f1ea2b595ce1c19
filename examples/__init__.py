"""Example workloads for gpupool (see examples/sentiment/)."""
