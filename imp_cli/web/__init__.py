"""The page `imp serve` shows at GET /: one HTML file, its stylesheet and its script, packaged
with imp (no CDN, no build step, works offline). The script talks to the server's own
/v1/chat/completions (streamed) and inserts model output as text only.

Sent with a Content-Security-Policy that allows scripts, styles and connections from the server
itself and nothing else (no inline script, no other origin); images only from the page's own
blob: previews. The page and its two files need no API key (they hold no data); the API does.
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8",
          "icon.svg": "image/svg+xml"}  # an icon of its own: else the browser asks for /favicon.ico
CONFIG = "/ui/config.json"  # what the page must know before it may call the API: whether it needs the key
PATHS = frozenset({"/", CONFIG, *(f"/ui/{name}" for name in ASSETS)})  # what needs no API key

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}


def routes(api_key_required: bool) -> list:
    """Starlette routes for the page: GET /, /ui/app.js, /ui/style.css, /ui/icon.svg and /ui/config.json (which
    says whether the API wants a key, so that the page asks for it before a request fails)."""
    import json

    from starlette.responses import Response
    from starlette.routing import Route

    def serve(name: str, media_type: str):
        body = (FOLDER / name).read_bytes()  # read once, at start-up

        async def endpoint(request):
            return Response(body, 200, HEADERS, media_type=media_type)

        return endpoint

    config = json.dumps({"api_key": api_key_required}).encode()

    async def settings(request):
        return Response(config, 200, HEADERS, media_type="application/json")

    return [Route("/", serve("index.html", "text/html; charset=utf-8"), methods=["GET", "HEAD"]),
            Route(CONFIG, settings, methods=["GET"]),
            *(Route(f"/ui/{name}", serve(name, kind), methods=["GET", "HEAD"]) for name, kind in ASSETS.items())]
