"""What build is running: version, git commit and build time (stamped by the image build)."""

from __future__ import annotations

import os
from functools import cache
from importlib import metadata


@cache
def info() -> dict[str, str]:
    """Version (BATON_VERSION, else the installed package); commit and time from BATON_COMMIT / BATON_BUILD_TIME.

    Read from the environment directly (not a service's settings): the image build sets them
    once (Dockerfile ARGs), they are the same for every service, and none of them is a secret.
    """
    version = os.environ.get("BATON_VERSION", "")
    if not version:
        try:
            version = metadata.version("baton")
        except metadata.PackageNotFoundError:
            version = "unknown"
    return {
        "version": version,
        "commit": os.environ.get("BATON_COMMIT", "") or "unknown",
        "build_time": os.environ.get("BATON_BUILD_TIME", "") or "unknown",
    }
