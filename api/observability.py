"""Per request: an id (the client's X-Request-ID when it sends a sane one, else a new one) that is
on every log line written while the request runs and on the response; one access-log line; and
the latency histogram of /metrics, by route template (not by raw path: ids stay out of labels)."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import metrics
from core import logs
from core.settings import get_settings

log = logging.getLogger("cvopt.access")
HEADER = b"x-request-id"
SANE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContext:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.access_log = get_settings().access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope.get("headers") or []).get(HEADER, b"").decode("latin-1")
        rid = sent if SANE.match(sent) else uuid.uuid4().hex
        token = logs.request_id.set(rid)
        started = time.perf_counter()
        status = {"code": 500}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", []), (HEADER, rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            template = route_template(scope)
            if template != "/metrics":
                metrics.observe(scope["method"], template, status["code"], started)
            if self.access_log:
                log.info(
                    "%s %s %d",
                    scope["method"],
                    scope["path"],
                    status["code"],
                    extra={
                        "method": scope["method"],
                        "route": template,
                        "status": status["code"],
                        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                    },
                )
            logs.request_id.reset(token)


def route_template(scope: Scope) -> str:
    """The matched route's template ("/v1/jobs/{job_id}"): ids stay out of metric labels. The
    versioned router is mounted twice; its routes know only their path below the prefix."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    if template is None:
        return "unmatched"
    if scope["path"].startswith("/v1/") and not template.startswith("/v1"):
        template = "/v1" + template
    return template


def install_request_context(app) -> None:
    app.add_middleware(RequestContext)
