"""Triton kernels of AdaWarm, installed as ``adawarm.kernels``."""
