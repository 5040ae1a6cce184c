"""What every worker process of the embedded Ray imports as it starts, before it takes a trial.

Ray starts one worker per CPU with the node, while `ray.init` returns, and those workers then wait for the
first trial actors while Tune sets the sweep up; with this module in Ray's `preload_python_modules` they
spend that wait importing what a trial needs (torch, timm, the model and training loop, FFCV), so a
trial starts on a process that has it all. A failure here is only logged by Ray: the trial imports again.
"""
import bvit.trial  # noqa: F401  (torch, timm, the model, the training loop)
import orchestrator.trainable  # noqa: F401
from bvit.data.format import import_ffcv

import_ffcv()
