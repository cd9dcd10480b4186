"""A local test web on loopback: routes with fixed responses, plus a site built from real photos.

Like img2dataset's ``tests/http_server.py``: the crawler is tested against a real HTTP server
serving good, bad and hostile responses, never against the internet.
"""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs


@dataclass
class Route:
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before the response starts
    trickle: float = 0.0  # seconds between 1 KiB chunks of the body
    send_length: bool = True


@dataclass
class Hit:
    """One request as the server saw it: when, on which of its addresses, with which headers."""

    path: str
    headers: dict[str, str]
    local_address: str  # the address the client connected to
    started: float  # time.monotonic() when the request line had been read
    finished: float = 0.0  # when the response was written (or abandoned)


class TestWeb:
    """A threaded HTTP server on 127.0.0.1 with a route table and a request log.

    ``hits`` records each request's time, connected address and headers; ``max_active`` the
    most requests the server held at once (during their delay). ``add_sequence`` serves a path's responses in
    turn (503, 503, then 200), the last one to every later request.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, port: int = 0) -> None:
        self.routes: dict[str, Route] = {}
        # Routes whose response depends on the query string (an API standing in for a search engine).
        self.dynamic: dict[str, Callable[[dict[str, list[str]]], Route | None]] = {}
        self.sequences: dict[str, list[Route]] = {}
        self.requests: list[str] = []
        self.hits: list[Hit] = []
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()
        web = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hit = Hit(self.path, dict(self.headers.items()), self.connection.getsockname()[0], time.monotonic())
                with web.lock:
                    web.hits.append(hit)
                try:
                    self._respond()
                finally:
                    hit.finished = time.monotonic()

            def _respond(self) -> None:
                web.requests.append(self.path)
                path, _, query = self.path.partition("?")
                dynamic = web.dynamic.get(path)
                route = web._next_in_sequence(path)
                if route is None:
                    route = dynamic(parse_qs(query)) if dynamic else web.routes.get(self.path) or web.routes.get(path)
                if route is None:
                    self.send_error(404)
                    return
                # Counted while the answer is held back: the client cannot have finished (and
                # sent its next request) before the count drops, whereas after the body is
                # written it can, before this thread runs again, and the count would overlap.
                with web.lock:
                    web.active += 1
                    web.max_active = max(web.max_active, web.active)
                try:
                    time.sleep(route.delay)
                finally:
                    with web.lock:
                        web.active -= 1
                self.send_response(route.status)
                self.send_header("Content-Type", route.content_type)
                if route.send_length:
                    self.send_header("Content-Length", str(len(route.body)))
                for name, value in route.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    if not route.trickle:
                        self.wfile.write(route.body)
                    for i in range(0, len(route.body), 1024) if route.trickle else ():
                        self.wfile.write(route.body[i : i + 1024])
                        self.wfile.flush()
                        time.sleep(route.trickle)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up, as it should for hostile responses
                if not route.send_length:
                    self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        # A short poll interval: stop() (server.shutdown) waits up to one, after every test.
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def add(self, path: str, body: bytes | str, content_type: str = "text/html; charset=utf-8", **kw: object) -> str:
        self.routes[path] = Route(body.encode() if isinstance(body, str) else body, content_type, **kw)  # type: ignore[arg-type]
        return self.url(path)

    def add_image(self, path: str, image: Path, content_type: str = "image/jpeg") -> str:
        return self.add(path, image.read_bytes(), content_type)

    def add_sequence(self, path: str, responses: list[Route]) -> str:
        """Serve ``responses`` to successive requests of ``path``; the last one repeats."""
        self.sequences[path] = list(responses)
        return self.url(path)

    def _next_in_sequence(self, path: str) -> Route | None:
        with self.lock:
            sequence = self.sequences.get(path)
            if not sequence:
                return None
            return sequence.pop(0) if len(sequence) > 1 else sequence[0]

    def hits_of(self, path: str) -> list[Hit]:
        with self.lock:
            return [hit for hit in self.hits if hit.path.partition("?")[0] == path]

    def start(self) -> TestWeb:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def build_photo_site(web: TestWeb, photos: list[Path], per_page: int = 5) -> str:
    """Serve ``photos`` as a small site: an index linking gallery pages that show them in
    several ways (``<img src>``, ``srcset``, a link to the file, ``og:image``). Returns the index URL.
    """
    pages = [photos[i : i + per_page] for i in range(0, len(photos), per_page)]
    links = []
    for n, group in enumerate(pages):
        body = []
        og = ""
        for i, photo in enumerate(group):
            web.add_image(f"/img/{photo.name}", photo)
            src = f"/img/{photo.name}"
            kind = i % 4
            if kind == 0:
                body.append(f'<img src="{src}" alt="{html.escape(photo.stem)}">')
            elif kind == 1:
                body.append(f'<img src="/img/thumb-missing.jpg" srcset="/img/thumb-missing.jpg 200w, {src} 640w">')
            elif kind == 2:
                body.append(f'<a href="{src}">full size</a>')
            else:
                og = f'<meta property="og:image" content="{src}">'
        page = f"<!doctype html><html><head>{og}<title>gallery {n}</title></head><body>{''.join(body)}</body></html>"
        web.add(f"/gallery/{n}.html", page)
        links.append(f'<a href="/gallery/{n}.html">gallery {n}</a>')
    web.add("/", "<!doctype html><html><body>" + " ".join(links) + "</body></html>")
    return web.url("/")
