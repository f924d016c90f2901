"""Test-only: let accelerate run FSDP2 on CPU ranks (gloo), so the tests exercise the real ``fully_shard`` path.

accelerate hands its FSDP plugin on only for GPU-like distributed types (``AcceleratorState.__init__``,
accelerate/state.py, the ``MULTI_GPU / NPU / XPU ...`` branch): on ``MULTI_CPU`` it drops the plugin and the Trainer
silently trains DDP. :func:`route_fsdp_on_cpu` wraps that constructor so that a plugin given on ``MULTI_CPU`` turns
the state into ``DistributedType.FSDP``, as the GPU branch would. Call it before the first ``TrainingArguments``.
The tests assert that parameters are DTensors during training, so a run that falls back to DDP cannot pass.
"""

from __future__ import annotations


def route_fsdp_on_cpu() -> None:
    import accelerate.state as state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__
    if getattr(original, "routes_fsdp_on_cpu", False):
        return

    def init(
        self,
        mixed_precision=None,
        cpu=False,
        dynamo_plugin=None,
        deepspeed_plugin=None,
        fsdp_plugin=None,
        *args,
        **kwargs,
    ):
        original(self, mixed_precision, cpu, dynamo_plugin, deepspeed_plugin, fsdp_plugin, *args, **kwargs)
        if fsdp_plugin is None or self.distributed_type != DistributedType.MULTI_CPU:
            return
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
        state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    init.routes_fsdp_on_cpu = True
    state.AcceleratorState.__init__ = init
