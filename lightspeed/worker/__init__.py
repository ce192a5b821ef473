"""The worker process: binds an engine core to the request and event planes.

factory.py chooses the executor (native or mocker) and builds the engine; process.py serves it on
the request plane and publishes KV events and metrics; perf_fit.py fits the step-time model.
"""
