"""baton's chat page: static HTML, CSS and JavaScript from the package, no build, no CDN."""

from __future__ import annotations

from importlib import resources
from typing import Any

from litestar import Response, get
from litestar.exceptions import NotFoundException

_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}


def _file(name: str) -> Response[bytes]:
    if name not in _FILES:
        raise NotFoundException()
    body = resources.files("services.gateway").joinpath("static", name).read_bytes()
    return Response(body, media_type=_FILES[name], headers={"Cache-Control": "no-cache"})


def routes() -> list[Any]:
    """The page at ``/`` and its two files under ``/static/`` (not part of the API document)."""

    @get("/", include_in_schema=False)
    async def index() -> Response[bytes]:
        return _file("index.html")

    @get("/static/{name:str}", include_in_schema=False)
    async def static(name: str) -> Response[bytes]:
        return _file(name)

    return [index, static]
