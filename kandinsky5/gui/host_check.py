"""Refuse requests that name another site: a page the user opens elsewhere can reach 127.0.0.1 through
DNS rebinding (a name that resolves to this machine), but its requests then carry that name in ``Host``,
and a cross-site request carries its site in ``Origin``. Only this machine's names, the address the UI
listens on and the names the user allows (``--allowed_host``) are answered."""

from __future__ import annotations

from urllib.parse import urlsplit

LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
SHARE_SUFFIX = ".gradio.live"  # the public link --share makes forwards requests with its own name


def host_name(value: str) -> str:
    """The name part of a Host header value ("127.0.0.1:7860", "[::1]:7860", "localhost")."""
    return (urlsplit(f"//{value}").hostname or "").lower()


def allowed_names(listen_host: str, extra: tuple[str, ...] = ()) -> frozenset[str]:
    names = set(LOCAL_NAMES) | {name.lower() for name in extra}
    if listen_host not in ("0.0.0.0", "::", ""):
        names.add(host_name(listen_host) or listen_host.lower())
    return frozenset(names)


class HostCheck:
    """ASGI middleware: HTTP and websocket requests whose Host, or Origin when sent, is not an allowed name
    get 403 and a sentence saying how to allow it."""

    def __init__(self, app, names: frozenset[str], share: bool = False):
        self.app, self.names, self.share = app, names, share

    def allowed(self, name: str) -> bool:
        return name in self.names or "*" in self.names or (self.share and name.endswith(SHARE_SUFFIX))

    def refusal(self, headers: dict[bytes, bytes]) -> str | None:
        host = host_name(headers.get(b"host", b"").decode("latin-1"))
        if not self.allowed(host):
            return f"Host {host or '(none)'!r}"
        origin = headers.get(b"origin")
        if origin is not None and origin != b"null":
            name = (urlsplit(origin.decode("latin-1")).hostname or "").lower()
            if not self.allowed(name):
                return f"Origin {name or origin.decode('latin-1')!r}"
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refused = self.refusal(dict(scope["headers"]))
        if refused is None:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        name = refused.split("'")[1] if "'" in refused else "NAME"
        body = (
            f"refused: {refused} is not an address this UI serves (it answers this machine's names and the "
            f"address it listens on). To allow it, start the UI with --allowed_host {name}\n"
        ).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})
