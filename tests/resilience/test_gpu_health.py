"""GpuHealth against fake `pynvml` modules (this suite runs without a GPU): decoding, per-query guarding, silence
when NVML is missing."""

import sys
import types
import warnings

import pytest

from engine.resilience.gpu_health import GpuHealth, throttle_reason_names


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):  # noqa: N801 - pynvml's naming
    pass


def fake_pynvml(*, init_error=None, unsupported=(), register_error=False, xids=(), old=False):
    """A module answering the calls GpuHealth makes; a name in `unsupported` raises NVMLError_NotSupported.
    `old`: a pynvml without nvmlDeviceGetCurrentClocksEventReasons."""
    m = types.ModuleType("pynvml")
    m.calls = []
    m.NVMLError = NVMLError
    m.NVML_TEMPERATURE_GPU, m.NVML_CLOCK_SM = 0, 1
    m.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, m.NVML_VOLATILE_ECC = 1, 0
    pending = list(xids)

    def api(name, result):
        def fn(*args):
            m.calls.append((name, args))
            if name in unsupported:
                raise NVMLError_NotSupported(name)
            return result(*args) if callable(result) else result

        setattr(m, name, fn)

    def init():
        if init_error is not None:
            raise init_error

    api("nvmlInit", lambda: init())
    api("nvmlShutdown", None)
    api("nvmlDeviceGetHandleByIndex", lambda i: f"handle{i}")
    api("nvmlDeviceGetHandleByUUID", lambda u: f"handle-{u}")
    api("nvmlDeviceGetMemoryInfo", types.SimpleNamespace(used=30e9, total=80e9, free=50e9))
    api("nvmlDeviceGetTemperature", 71)
    api("nvmlDeviceGetPowerUsage", 412_500)  # milliwatts
    api("nvmlDeviceGetClockInfo", 1980)
    api("nvmlDeviceGetTotalEccErrors", 2)
    if not old:
        api("nvmlDeviceGetCurrentClocksEventReasons", 0x4 | 0x40 | 0x1000)
    api("nvmlDeviceGetCurrentClocksThrottleReasons", 0x8)
    api("nvmlEventSetCreate", "eventset")
    api("nvmlEventSetFree", None)

    def register(*args):
        if register_error:
            raise NVMLError_NotSupported("events")

    def wait(*args):
        if not pending:
            raise NVMLError("Timeout")
        return types.SimpleNamespace(eventType=0x8, eventData=pending.pop(0))

    api("nvmlDeviceRegisterEvents", register)
    api("nvmlEventSetWait", wait)
    return m


@pytest.fixture
def silent(capsys, caplog):
    """Fails the test if GpuHealth printed, logged or warned."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield
    out, err = capsys.readouterr()
    assert out == err == "" and caplog.records == []


def test_without_pynvml_unavailable_and_silent(monkeypatch, silent):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    gpu = GpuHealth(0)
    assert not gpu.available and gpu.sample() == {}
    gpu.close()


def test_init_failure_unavailable_and_silent(monkeypatch, silent):
    fake = fake_pynvml(init_error=NVMLError("NVML Shared Library Not Found"))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    gpu = GpuHealth(0)
    assert not gpu.available and gpu.sample() == {}
    assert [name for name, _ in fake.calls] == ["nvmlInit"]


def test_sample_decodes_and_an_unsupported_query_loses_only_its_key(monkeypatch, silent):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = fake_pynvml(unsupported={"nvmlDeviceGetTotalEccErrors"}, xids=[79, 48])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    gpu = GpuHealth(1)
    assert gpu.available and ("nvmlDeviceGetHandleByIndex", (1,)) in fake.calls
    s = gpu.sample()
    assert s == {
        "gpu_mem_used_gb": 30.0,
        "gpu_mem_total_gb": 80.0,
        "gpu_temp_c": 71,
        "gpu_power_w": 412.5,
        "gpu_sm_clock_mhz": 1980,
        "gpu_throttle": ["sw_power_cap", "hw_thermal_slowdown", "0x1000"],
        "gpu_xid": [79, 48],
    }
    assert gpu.sample()["gpu_xid"] == []  # drained: only new events each sample
    gpu.close()
    assert not gpu.available and gpu.sample() == {}
    assert ("nvmlEventSetFree", ("eventset",)) in fake.calls and fake.calls[-1][0] == "nvmlShutdown"


def test_ecc_reported_and_throttle_falls_back_to_the_old_query(monkeypatch):
    fake = fake_pynvml(unsupported={"nvmlDeviceGetCurrentClocksEventReasons"}, register_error=True)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    s = GpuHealth(0).sample()
    assert s["gpu_throttle"] == ["hw_slowdown"] and s["gpu_ecc_uncorrected"] == 2
    assert "gpu_xid" not in s  # event registration refused
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(old=True))
    assert GpuHealth(0).sample()["gpu_throttle"] == ["hw_slowdown"]


def test_cuda_visible_devices_maps_to_the_nvml_device(monkeypatch):
    fake = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert GpuHealth(1)._handle == "handle5"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa,GPU-bbbb")
    assert GpuHealth(1)._handle == "handle-GPU-bbbb"


def test_throttle_reason_names():
    assert throttle_reason_names(0) == []
    assert throttle_reason_names(0x1 | 0x100) == ["gpu_idle", "display_clock_setting"]
