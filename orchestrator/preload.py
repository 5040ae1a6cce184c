"""What every worker process of the embedded Ray imports as it starts, before it takes a trial.

Ray starts one worker per CPU with the node, while `ray.init` returns, and those workers then wait for the
first trial actors while Tune sets the sweep up; with this module in Ray's `preload_python_modules` they
spend that wait importing what a trial needs (torch, timm, the model and training loop, FFCV), so a
trial starts on a process that has it all. A failure here is only logged by Ray: the trial imports again.

Nothing here may ask CUDA anything: the worker does not yet know its trial's GPUs (Ray sets
CUDA_VISIBLE_DEVICES when the trial arrives, a `gpus: 0` trial blanks it), and CUDA reads that variable
once, when first asked. FFCV asks at import (`torch.cuda.is_available()` in its epoch iterator, which then
opens a CUDA context for every loader), so it is preloaded only where the machine has no NVIDIA device.
"""
import glob

import mlflow.system_metrics.metrics.gpu_monitor  # noqa: F401  (a trial's system metrics: MLflow's monitors
import mlflow.tracking  # noqa: F401  and client, ~1.8 s to import on a small CPU; no CUDA, NVML is not opened)

import bvit.trial  # noqa: F401  (torch, timm, the model, the training loop: none of them asks CUDA)
import orchestrator.trainable  # noqa: F401
from bvit.data.format import import_ffcv

NVIDIA_DEVICES = "/dev/nvidia[0-9]*"  # one per GPU the NVIDIA driver exposes (in a container: those given to it)

if not glob.glob(NVIDIA_DEVICES):
    import_ffcv()
