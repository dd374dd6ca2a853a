from .device_avg_non_zero_reducer import DeviceAvgNonZeroReducer

__all__ = ["DeviceAvgNonZeroReducer"]
