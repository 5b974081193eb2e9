"""The dashboard (`/ui`): static files, no build step and no CDN (the controller may be offline).

It reads the same API the CLI does (`/llamafleet/v1/...`, `/api/...`), follows the event stream,
and sends the key the operator typed when the controller asks for one (the admin key: most
of what it reads is a control route).
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

UI_DIR = Path(__file__).parent / "ui"
FILES = {"index.html": "text/html", "app.js": "text/javascript", "app.css": "text/css"}


def dashboard_routes() -> web.RouteTableDef:
    routes = web.RouteTableDef()

    @routes.get("/ui")
    async def ui_root(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/ui/")

    @routes.get("/ui/")
    @routes.get("/ui/{name}")
    async def ui_file(request: web.Request) -> web.StreamResponse:
        name = request.match_info.get("name", "index.html")
        if name not in FILES:  # a fixed set: no path from the request ever reaches the file system
            raise web.HTTPNotFound(reason=f"no {name} in the dashboard")
        return web.Response(body=(UI_DIR / name).read_bytes(), content_type=FILES[name],
                            headers={"Cache-Control": "no-cache"})

    return routes
