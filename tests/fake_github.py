"""A fake of the GitHub endpoints pi-ai's Copilot login and token refresh use, on 127.0.0.1.

    POST /login/device/code            -> a device code (interval 1 s)
    POST /login/oauth/access_token     -> `authorization_pending` `pending_polls` times, then a GitHub token
    GET  /copilot_internal/v2/token    -> a fresh Copilot token for the GitHub token in Authorization
    GET  /copilot_internal/user        -> the subscription and its quotas (QUOTA), as Copilot clients see them

Copilot tokens look like the real ones (`tid=...;exp=...;proxy-ep=proxy.copilot.test;`), so the API
base URL derived from them is https://api.copilot.test: tests redirect that, github.com and
api.github.com here and to the fake upstream with PI_PROXY_TEST_REDIRECTS.
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GITHUB_TOKEN = "ghu_fakeGitHubToken0123456789"
COPILOT_HOST = "copilot.test"
# GET /copilot_internal/user's answer for an individual Pro plan, as GitHub sends it (fields abridged).
QUOTA = {
    "login": "octocat", "access_type_sku": "plus_monthly_subscriber_quota", "copilot_plan": "individual_pro",
    "chat_enabled": True, "quota_reset_date": "2026-12-01",
    "quota_snapshots": {
        "chat": {"entitlement": 0, "remaining": 0, "percent_remaining": 100.0, "unlimited": True,
                 "overage_count": 0, "overage_permitted": False, "quota_id": "chat", "quota_remaining": 0.0},
        "completions": {"entitlement": 0, "remaining": 0, "percent_remaining": 100.0, "unlimited": True,
                        "overage_count": 0, "overage_permitted": False, "quota_id": "completions",
                        "quota_remaining": 0.0},
        "premium_interactions": {"entitlement": 300, "remaining": 213, "percent_remaining": 71.2, "unlimited": False,
                                 "overage_count": 0, "overage_permitted": True, "quota_id": "premium_interactions",
                                 "quota_remaining": 213.6},
    },
}


class FakeGitHub:
    def __init__(self):
        self.exchanges: list[str] = []  # the GitHub token of every Copilot token request
        self.quota_requests: list[str] = []  # the Authorization header of every quota request
        self.refuse_exchange = False  # answer token exchanges with 401
        self.exchange_delay = 0.0  # seconds each token exchange takes (to widen races)
        self.pending_polls = 1
        self.issued = 0
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path == "/login/device/code":
                    self.reply(200, {"device_code": "dev-123", "user_code": "ABCD-1234", "interval": 1,
                                     "verification_uri": "https://github.com/login/device", "expires_in": 900})
                elif self.path == "/login/oauth/access_token":
                    with owner.lock:
                        owner.pending_polls -= 1
                        pending = owner.pending_polls >= 0
                    self.reply(200, {"error": "authorization_pending"} if pending else
                               {"access_token": GITHUB_TOKEN, "token_type": "bearer"})
                else:
                    self.reply(404, {"message": "Not Found"})

            def do_GET(self):
                if self.path == "/copilot_internal/user":
                    owner.quota_requests.append(self.headers.get("authorization", ""))
                    if self.headers.get("authorization") != f"token {GITHUB_TOKEN}" or owner.refuse_exchange:
                        return self.reply(401, {"message": "Bad credentials"})
                    return self.reply(200, QUOTA)
                if self.path != "/copilot_internal/v2/token":
                    return self.reply(404, {"message": "Not Found"})
                github_token = self.headers.get("authorization", "").removeprefix("Bearer ").removeprefix("token ")
                time.sleep(owner.exchange_delay)
                with owner.lock:
                    owner.exchanges.append(github_token)
                    owner.issued += 1
                    serial = owner.issued
                if owner.refuse_exchange:
                    return self.reply(401, {"message": "Bad credentials"})
                expires_at = int(time.time()) + 1800
                token = f"tid=copilot-{serial};exp={expires_at};sku=free;proxy-ep=proxy.{COPILOT_HOST};"
                self.reply(200, {"token": token, "expires_at": expires_at, "refresh_in": 1500})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def copilot_token(serial: str, expires_in: float) -> tuple[str, int]:
    """A Copilot token and its `expires` in milliseconds, as auth.json stores them."""
    expires = int((time.time() + expires_in) * 1000)
    return f"tid=stored-{serial};exp={expires // 1000};proxy-ep=proxy.{COPILOT_HOST};", expires
