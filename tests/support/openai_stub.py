"""A stub OpenAI-compatible server on loopback, for the servers vLLM's is not (tests of what plad-ray refuses)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def send_json(handler: BaseHTTPRequestHandler, status: int, headers: dict, payload) -> None:
    data = json.dumps(payload).encode()
    handler.send_response(status)
    for k, v in {"Content-Type": "application/json", **headers}.items():
        handler.send_header(k, v)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def serve(handler) -> tuple[ThreadingHTTPServer, str]:
    """A threaded server of `handler` on a free loopback port, and its completions URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}/v1/completions"


class Stub:
    """/v1/models, /v1/completions and /tokenize, each answered by a function of the request body."""

    def __init__(self, completions, tokenize, max_model_len=64):
        routes = {"/v1/completions": completions, "/tokenize": tokenize}
        self.requests = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._send(200, {"data": [{"id": "stub-teacher", "max_model_len": max_model_len}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append((self.path, body))
                route = routes.get(self.path)
                self._send(*(route(body) if route else (404, {"detail": "Not Found"})))

            def _send(self, status, payload):
                send_json(self, status, {}, payload)

        self.server, self.url = serve(Handler)

    def close(self):
        self.server.shutdown()
