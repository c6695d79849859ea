"""GPU health sampled through NVML (the `nvidia-ml-py` package, imported as `pynvml`): memory, temperature, power,
SM clock, clock-throttle reasons, uncorrectable ECC errors and XID events, as a flat dict for the metrics logger.

Optional by design: without the package, or without a driver (nvmlInit raises, e.g. NVMLError_LibraryNotFound on a
CPU machine), the object is unavailable and `sample()` returns {} without a word, so callers need no checks. Each
query is guarded on its own: a GPU or driver that does not support one (power on some boards, ECC on consumer cards)
loses that key only.

XID events (the driver's error codes: 48 double-bit ECC, 79 fallen off the bus, ...) come from an NVML event set
registered once for critical XIDs and polled with a zero timeout at each sample, so a sample never waits; where
registration is refused (no support, no permission) `gpu_xid` is left out.
"""

from __future__ import annotations

import os
from typing import Any

# Clock event (formerly "throttle") reason bits, as in nvml.h; newer drivers name them ClocksEventReasons.
_THROTTLE_REASONS: tuple[tuple[int, str], ...] = (
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
)
_XID_EVENT = 0x8  # nvmlEventTypeXidCriticalError
_MAX_XIDS_PER_SAMPLE = 64  # bounds the poll if the driver floods events


def throttle_reason_names(mask: int) -> list[str]:
    """The names of the reason bits set in `mask`; unknown bits as hex, so a newer driver's reason is not lost."""
    names = [name for bit, name in _THROTTLE_REASONS if mask & bit]
    rest = mask & ~sum(bit for bit, _ in _THROTTLE_REASONS)
    names.extend(f"0x{1 << i:x}" for i in range(64) if rest >> i & 1)
    return names


def _visible_device(index: int) -> str | None:
    """The CUDA_VISIBLE_DEVICES entry that CUDA index `index` refers to (None when unset or out of range): NVML
    numbers GPUs physically and ignores that variable."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return None
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    return entries[index] if index < len(entries) else None


class GpuHealth:
    """NVML queries for one GPU; `available` is False (and `sample()` empty) without pynvml or a driver.

    `device_index` is the CUDA index (torch's `cuda:N`), mapped through CUDA_VISIBLE_DEVICES (integer indices or
    GPU-/MIG- UUIDs) to the NVML device.
    """

    def __init__(self, device_index: int) -> None:
        self.device_index = device_index
        self.available = False
        self._nvml: Any = None
        self._handle: Any = None
        self._events: Any = None
        try:
            import pynvml
        except ImportError:
            return
        try:
            pynvml.nvmlInit()
        except Exception:  # noqa: BLE001 - NVMLError_LibraryNotFound, _DriverNotLoaded, ...: no GPU to watch
            return
        try:
            entry = _visible_device(device_index)
            if entry is not None and entry.startswith(("GPU-", "MIG-")):
                self._handle = pynvml.nvmlDeviceGetHandleByUUID(entry)
            else:
                index = int(entry) if entry is not None and entry.isdigit() else device_index
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except pynvml.NVMLError:
            pynvml.nvmlShutdown()
            return
        self._nvml = pynvml
        self.available = True
        try:
            self._events = pynvml.nvmlEventSetCreate()
            pynvml.nvmlDeviceRegisterEvents(self._handle, _XID_EVENT, self._events)
        except pynvml.NVMLError:
            self._free_events()

    def _free_events(self) -> None:
        if self._events is not None:
            try:
                self._nvml.nvmlEventSetFree(self._events)
            except self._nvml.NVMLError:
                pass
            self._events = None

    def _xids(self) -> list[int]:
        """The XID codes reported since the last sample, without waiting."""
        out = []
        for _ in range(_MAX_XIDS_PER_SAMPLE):
            try:
                event = self._nvml.nvmlEventSetWait(self._events, 0)
            except self._nvml.NVMLError:  # NVMLError_Timeout: nothing pending
                break
            out.append(int(event.eventData))
        return out

    def sample(self) -> dict[str, Any]:
        """Current readings: `gpu_mem_used_gb`, `gpu_mem_total_gb` (1e9 bytes), `gpu_temp_c`, `gpu_power_w`,
        `gpu_sm_clock_mhz`, `gpu_throttle` (reason names, [] when unthrottled), `gpu_ecc_uncorrected` (volatile
        count since the driver loaded) and `gpu_xid` (codes since the last sample); a key is missing when its
        query is unsupported. {} when unavailable."""
        if not self.available:
            return {}
        nvml, h = self._nvml, self._handle
        out: dict[str, Any] = {}

        def query(fn):
            try:
                return fn()
            except nvml.NVMLError:
                return None

        mem = query(lambda: nvml.nvmlDeviceGetMemoryInfo(h))
        if mem is not None:
            out["gpu_mem_used_gb"] = mem.used / 1e9
            out["gpu_mem_total_gb"] = mem.total / 1e9
        readings = {
            "gpu_temp_c": lambda: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
            "gpu_power_w": lambda: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0,  # milliwatts
            "gpu_sm_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM),
            "gpu_ecc_uncorrected": lambda: nvml.nvmlDeviceGetTotalEccErrors(
                h, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC
            ),
        }
        for key, fn in readings.items():
            value = query(fn)
            if value is not None:
                out[key] = value
        # The newer name first; an older pynvml lacks it, an older driver answers NVMLError_FunctionNotFound.
        for name in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
            fn = getattr(nvml, name, None)
            mask = query(lambda fn=fn: fn(h)) if fn is not None else None
            if mask is not None:
                out["gpu_throttle"] = throttle_reason_names(int(mask))
                break
        if self._events is not None:
            out["gpu_xid"] = self._xids()
        return out

    def close(self) -> None:
        """Frees the event set and shuts NVML down; the object is unavailable afterwards."""
        if not self.available:
            return
        self._free_events()
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError:
            pass
        self.available = False
