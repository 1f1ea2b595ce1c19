"""gpupool"""
