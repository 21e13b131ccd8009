"""OpenVINO, imported without its usage reports: every OpenVINO module here imports it through this one.

`import openvino` sends an "import" event to Intel through Google Analytics, and ov.convert_model
more, unless a consent file in the home folder says no; the first also writes a client id there. A
self-hosted service must not phone home or write outside its folders, so before openvino is imported
its telemetry class is replaced by one that does nothing (as OpenVINO's own stand-in does when the
openvino-telemetry package is missing).
"""

from __future__ import annotations


class SilentTelemetry:
    """Takes every call openvino_telemetry.Telemetry takes from OpenVINO; records and sends nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def send_event(self, *args, **kwargs):
        pass

    def send_error(self, *args, **kwargs):
        pass

    def send_stack_trace(self, *args, **kwargs):
        pass

    def start_session(self, *args, **kwargs):
        pass

    def end_session(self, *args, **kwargs):
        pass

    def force_shutdown(self, *args, **kwargs):
        pass


try:
    import openvino_telemetry
except ImportError:  # OpenVINO then uses its own stand-in
    pass
else:
    openvino_telemetry.Telemetry = SilentTelemetry

import openvino as ov  # noqa: E402  (after the telemetry is silenced, which is this module's job)

__all__ = ["ov"]
