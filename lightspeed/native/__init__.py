"""The native executor: runs a real model (PyTorch) for the engine core's scheduled batches.

runner.py turns a SchedulerOutput into one forward pass and samples; executor.py runs the runner
on the model thread; sampler.py holds the sampling; kv_transfer.py exports/imports block contents.
"""
