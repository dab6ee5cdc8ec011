"""Where a run executes: the device, the torchrun process group and the speed settings (``perf``)."""
