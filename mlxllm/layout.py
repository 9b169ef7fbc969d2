"""How a training group's processes sit on devices: which of them share one device (and its memory),
and how many devices the group trains on (the MFU peak).

Processes on one machine share its device on a Mac (one GPU) and on the CPU (one RAM, one set of cores).
Under `mlx.launch --backend nccl` on CUDA each process has a GPU of its own: MLX's launcher gives rank r
`CUDA_VISIBLE_DEVICES=r % gpus`, and MLX's NCCL group sets the device to rank % visible GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlxllm.distributed import Group


@dataclass(frozen=True)
class Layout:
    """The group's processes and devices, as the memory check and the MFU peak count them."""

    processes: int = 1  # in the whole group
    local: int = 1  # of them on this machine
    own_device: bool = False  # each process has a GPU of its own; else this machine's processes share one device

    @property
    def sharing(self) -> int:
        """Processes that share this process's device, and so its memory (this one included)."""
        return 1 if self.own_device else self.local

    @property
    def devices(self) -> int:
        """Devices the group trains on: one per process with GPUs of their own, else one per machine."""
        return self.processes if self.own_device else max(1, self.processes // self.local)

    def describe(self) -> str:
        if self.sharing > 1:
            return f"{self.sharing} processes share this device"
        return f"{self.devices} devices, one per process" if self.devices > 1 else "one device"


def layout(group: Group, backend: str) -> Layout:
    """The layout of `group` (its size and processes on this machine) on MLX's `backend` ('cpu', 'metal',
    'cuda'): only NCCL on CUDA gives each process a device of its own."""
    own = backend == "cuda" and group.backend == "nccl"
    return Layout(processes=group.size, local=group.local_size, own_device=own)


def group_peak(device_peak: float, where: Layout) -> float:
    """The group's peak FLOP/s, for MFU against the group's tokens/s: one device's peak per device."""
    return device_peak * where.devices
