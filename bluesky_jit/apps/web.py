"""A live web view of the scan a JitProcess or JitCallback is processing.

::

    view = WebView(jit, api_key=key, port=8080).start()   # http://127.0.0.1:8080/
    ...
    view.stop()

The page (``/``) asks for the API key (the catalog's) and sends it with every
request as ``Authorization: Apikey KEY``, as Tiled's clients do; every
``/api`` route answers 401 without it. It shows the newest reconstructed
slice of the plane picked (axial xy, vertical xz or yz), the newest denoised
slice, the ``uncertainty`` image where the run has one, and the learning
curve, refreshed every second; it moves the plane picked and sets the centre
of rotation (both applied at the next slice refresh). Routes:

=========================  ====================================================
``GET /api/state``         JSON: the run, its counts, an etag per image stream,
                           where the slices lie, the centre of rotation and the
                           learning curve (``step``, ``loss``, ``alpha``)
``GET /api/image/S.png``   the newest image of stream S (``reconstruction``,
                           ``reconstruction_xz``, ``reconstruction_yz``,
                           ``denoised``, ...) as a grey PNG with its ETag
``POST /api/move``         ``{"plane": "xy", "position": 3}``: a detector row
                           (xy), the y (xz) or x (yz) in mm
``POST /api/center``       ``{"center_of_rotation": 63.5}``: a detector column
=========================  ====================================================

The server (uvicorn) runs on a thread of its own and only reads the callback's
``progress()`` snapshots, so nothing waits on it.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import math
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .live import PLANES, _to_uint8, _window, newest_summary

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

__all__ = ["PLANES", "WebView"]

_PAGE = Path(__file__).with_name("web_page.html")


class WebView:
    """Serve the live web view of ``jit`` (a :class:`~bluesky_jit.worker_process.JitProcess`
    or :class:`~bluesky_jit.callbacks.JitCallback`).

    Parameters
    ----------
    jit : JitProcess or JitCallback
        Read through ``progress()`` and ``summaries``; steered through
        ``move_slices`` and ``set_center``.
    api_key : str
        The key the page must send (the catalog's); never logged.
    host : str
        Address to listen on: ``127.0.0.1`` (this machine) by default;
        ``0.0.0.0`` for other machines.
    port : int
        0 picks a free port (see :attr:`url` after :meth:`start`).
    """

    def __init__(self, jit: Any, *, api_key: str, host: str = "127.0.0.1", port: int = 0) -> None:
        if not isinstance(api_key, str) or not api_key:
            raise ConfigError(
                "The web view needs an API key (the page must send it): set TILED_API_KEY or "
                "pass --api-key-file FILE."
            )
        self.jit = jit
        self.host, self.port = host, int(port)
        self._key = api_key.encode()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.app = self._make_app()

    @property
    def url(self) -> str:
        """The page's address."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> WebView:
        """Listen (the port is taken before this returns) and serve on a daemon thread."""
        import uvicorn

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            sock = socket.create_server((self.host, self.port), family=family)
        except OSError as error:
            raise ConfigError(
                f"The web view cannot listen on {self.host}:{self.port}: "
                f"{error.strerror or error}. Pick another port (0: any free one)."
            ) from error
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="bluesky-jit-web", daemon=True
        )
        self._thread.start()  # connections wait in the socket's backlog until it serves
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the app -----------------------------------------------------------------------
    def _make_app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.responses import HTMLResponse
        from starlette.routing import Route

        async def page(request: Request) -> Response:
            return HTMLResponse(_PAGE.read_text(), headers={"Cache-Control": "no-store"})

        routes = [
            Route("/", page),
            Route("/api/state", self._guard(self._state)),
            Route("/api/image/{stream}.png", self._guard(self._image)),
            Route("/api/move", self._guard(self._move), methods=["POST"]),
            Route("/api/center", self._guard(self._center), methods=["POST"]),
        ]
        return Starlette(routes=routes)

    def _guard(self, handler: Any) -> Any:
        async def guarded(request: Request) -> Response:
            scheme, _, key = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "apikey" or not hmac.compare_digest(key.encode(), self._key):
                return _error(
                    401,
                    "Missing or wrong API key: send the catalog's key as "
                    "'Authorization: Apikey KEY'.",
                    {"WWW-Authenticate": "Apikey"},
                )
            return await handler(request)

        return guarded

    async def _state(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        summary = newest_summary(self.jit)
        if summary is None or summary.geometry is None:
            return JSONResponse({"raw_uid": None})
        g = summary.geometry
        running = any(s.raw_uid == summary.raw_uid for s in self.jit.progress())
        return JSONResponse(
            {
                "raw_uid": summary.raw_uid,
                "derived_uid": summary.derived_uid,
                "status": "running" if running else summary.exit_status,
                "projections": summary.projections,
                "slices": summary.slices,
                "denoised": summary.denoised,
                "train_steps": summary.train_steps,
                "images": {name: _etag(image) for name, image in summary.images.items()},
                "positions": summary.positions,
                "rows": g.rows,
                "cols": g.cols,
                "slice_size": g.slice_size,
                "voxel_size": g.voxel_size,
                "center_of_rotation": g.center_of_rotation,
                "metrics": [
                    {k: _finite(m.get(k)) for k in ("step", "loss", "alpha")}
                    for m in summary.metrics
                ],
            }
        )

    async def _image(self, request: Request) -> Response:
        from starlette.responses import Response

        stream = request.path_params["stream"]
        summary = newest_summary(self.jit)
        images = {} if summary is None else summary.images
        if stream not in images:
            return _error(
                404, f"No image of stream {stream!r} yet; there are: {sorted(images) or 'none'}."
            )
        image = images[stream]
        etag = _etag(image)
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag})
        # the denoised slice in the reconstruction's grey window: the two compare
        window = _window(images.get("reconstruction") if stream == "denoised" else image)
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(_to_uint8(image, window)).save(buffer, format="PNG")
        headers = {"ETag": etag, "Cache-Control": "no-store"}
        return Response(buffer.getvalue(), media_type="image/png", headers=headers)

    async def _move(self, request: Request) -> Response:
        body, summary = await self._request(request, ("plane", "position"))
        if not isinstance(body, dict):
            return body
        plane, position = body["plane"], body["position"]
        g = summary.geometry
        if plane not in PLANES:
            return _error(400, f"plane must be one of {sorted(PLANES)}; got {plane!r}.")
        if plane == "xy":
            if position != int(position) or not 0 <= position < g.rows:
                return _error(
                    400, f"An xy slice lies at a detector row 0..{g.rows - 1}; got {position!r}."
                )
            self.jit.move_slices(slice_row=int(position))
        else:
            half = g.slice_size * g.voxel_size / 2
            if abs(position) > half:
                return _error(
                    400,
                    f"An {plane} slice lies at -{half:g}..{half:g} mm from the rotation axis; "
                    f"got {position!r}.",
                )
            self.jit.move_slices(vertical={1 if plane == "xz" else 2: float(position)})
        return _accepted({"plane": plane, "position": position})

    async def _center(self, request: Request) -> Response:
        body, summary = await self._request(request, ("center_of_rotation",))
        if not isinstance(body, dict):
            return body
        center, cols = body["center_of_rotation"], summary.geometry.cols
        if not 0 <= center <= cols - 1:
            return _error(
                400,
                f"center_of_rotation is a detector column 0..{cols - 1}; got {center!r}.",
            )
        self.jit.set_center(float(center))
        return _accepted({"center_of_rotation": center})

    async def _request(self, request: Request, numbers: tuple[str, ...]) -> tuple[Any, Any]:
        """The JSON body (its ``numbers`` checked) and the scan's summary, or an error."""
        try:
            body = await request.json()
        except ValueError:
            body = None
        wanted = ", ".join(f'"{k}"' for k in numbers)
        if not isinstance(body, dict) or not all(k in body for k in numbers):
            return _error(400, f"Expected a JSON object with {wanted}; got {body!r}."), None
        numeric = [k for k in numbers if k != "plane"]
        if not all(isinstance(body[k], (int, float)) and math.isfinite(body[k]) for k in numeric):
            return _error(400, f"Expected numbers for {numeric}; got {body!r}."), None
        summary = newest_summary(self.jit)
        if summary is None or summary.geometry is None:
            return _error(409, "No scan is being processed: nothing to move yet."), None
        return body, summary


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    from starlette.responses import JSONResponse

    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _accepted(content: dict[str, Any]) -> Response:
    from starlette.responses import JSONResponse

    return JSONResponse(content | {"applies": "at the next slice refresh"}, status_code=202)


def _etag(image: Any) -> str:
    return '"' + hashlib.blake2b(image.tobytes(), digest_size=8).hexdigest() + '"'


def _finite(value: Any) -> float | None:
    """JSON has no NaN: None instead."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
