"""What every service uses: schemas, subjects, the bus, config, logging, metrics, tracing."""

import importlib as _importlib
import sys as _sys

# Optional extras two libraries load when installed, for features the services never use:
# structlog's console renderer imports rich (installed for litestar's CLI), OpenTelemetry's
# process resource detector imports psutil. ~7 MB of RSS per service; hidden while those two
# modules first load, importable as usual afterwards.
for _module, _extra in (("structlog", "rich"), ("opentelemetry.sdk.resources", "psutil")):
    if _module not in _sys.modules and _extra not in _sys.modules:
        _sys.modules[_extra] = None  # type: ignore[assignment]
        try:
            _importlib.import_module(_module)
        finally:
            del _sys.modules[_extra]
