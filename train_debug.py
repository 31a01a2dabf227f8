"""Compile and throughput diagnostics. Not built yet: issue #4 ("torch.compile without graph breaks
or recompiles, and train_debug.py diagnostics") builds it."""

import sys

if __name__ == "__main__":
    sys.exit("train_debug.py is not implemented yet; it is built by issue #4.")
