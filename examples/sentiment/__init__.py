"""The MLPerf sentiment-analysis workload (a CNN on aclImdb), trained and served through gpupool."""
