"""Data layer: dataset readers, synthetic pedestrians, samplers, transforms and loader builders.

`python -m data --config FILE` reads the dataset a config names and prints its summary (a quick check
that data_root is right before training).
"""
