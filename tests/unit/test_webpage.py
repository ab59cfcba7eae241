"""The chat page's files are served from the package, and nothing else is under /static/."""

from litestar import Litestar
from litestar.testing import TestClient

from services.gateway import webpage


def test_page_and_its_files_are_served() -> None:
    with TestClient(Litestar(route_handlers=webpage.routes())) as c:
        page = c.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert '<script src="/static/app.js">' in page.text
        script = c.get("/static/app.js").text
        assert "Idempotency-Key" in script
        assert "/tool-approvals" in script and "input_digest" in script
        assert "http://" not in script and "https://" not in script  # nothing from a CDN
        assert c.get("/static/app.css").headers["content-type"].startswith("text/css")
        assert c.get("/static/webpage.py").status_code == 404
        assert c.get("/static/..%2Fwebpage.py").status_code == 404
