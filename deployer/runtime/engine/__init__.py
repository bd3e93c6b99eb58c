"""The engine: continuous batching of every accepted request over one model context.

    core          Engine (the model thread's loop) and Job (one request's work and its channel)
    scheduler     pure: slots, the waiting queue, prompt-cache reuse, each step's batches, and the
                  one place a step's sampled tokens are applied (Scheduler.update)
    sampling      what a request asks of the engine (Generation, Sampling) and what a step gives
                  back per choice (Delta), stop strings held back across tokens
    checkpoints   sliding-window caches saved at chunk boundaries, so a cached prefix stays reusable
    model         ModelInterface: the narrow interface the engine drives (llama.cpp's in
                  :mod:`deployer.runtime.llama`, a fake one in the tests)
    errors        what the engine reports (busy, shutting down, internal): the app gives each its
                  protocol's status and shape

Arrows point one way: the protocols call the engine, the engine calls the model interface.
"""
