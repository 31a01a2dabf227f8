"""Training: the loop (trainer.py) and what only training needs: which samples form a step (batching.py), accumulation
that survives out-of-memory (accumulation.py), stages, optimizer and schedule (optim.py, train_config.py), processes
(distributed.py), device settings (device.py), stop signals, tracking (JSONL, W&B), the end-of-run report and curves.
The trainer is handed its config and parts (parts.py) ready-made by train.py; the checkpoint format is
vlm/checkpoint.py's.
"""
