"""Diagnostics of train_debug.py: graph breaks, recompiles, compile latency, speed, memory and MFU on synthetic
batches shaped by a config, before anyone spends GPU time."""
