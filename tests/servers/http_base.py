"""What the scripted test servers share: an HTTP server thread and its OpenAI-style base URL."""

from __future__ import annotations

import threading


class BackgroundServer:
    """Subclasses set ``self.httpd`` (a ThreadingHTTPServer); ``start`` serves it on a daemon thread."""

    httpd = None

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
