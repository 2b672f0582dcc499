"""A stand-in for the Hugging Face hub's upload API on loopback (the hub is not reachable here):
repository and branch creation, the pre-upload check, the Git LFS batch API with basic transfers,
and the commit endpoint, with the requests huggingface_hub's `HfApi.upload_folder` makes when
hf_xet is disabled (the Xet path needs the hub's content-addressed store, which has no stand-in).

Every API request must carry `Authorization: Bearer <token>`; files land in `state["repos"]`.
"""

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def start(token: str):
    """(server, state): state["repos"][repo_id] = {"private", "branches": {name: {"commit", "files"}}}."""
    state = {"repos": {}, "lfs": {}, "requests": [], "token": token}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: dict | None = None):
            data = json.dumps(body or {}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _authorized(self) -> bool:
            state["requests"].append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
            if self.headers.get("Authorization") != f"Bearer {state['token']}":
                self._send(401, {"error": "Invalid credentials in Authorization header"})
                return False
            return True

        def do_GET(self):  # /api/models/<org>/<name>: the repository's info
            if not self._authorized():
                return
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)", self.path.split("?")[0])
            if not m or m.group(1) not in state["repos"]:
                return self._send(404, {"error": "Repository not found"})
            repo = state["repos"][m.group(1)]
            self._send(200, {"id": m.group(1), "private": repo["private"], "sha": repo["branches"]["main"]["commit"],
                             "siblings": [{"rfilename": f} for f in repo["branches"]["main"]["files"]]})

        def do_PUT(self):  # an LFS object, to the href the batch API gave (presigned: no token)
            state["requests"].append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
            m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", self.path)
            data = self._body()
            if not m or hashlib.sha256(data).hexdigest() != m.group(1):
                return self._send(400, {"error": "object does not match its oid"})
            with lock:
                state["lfs"][m.group(1)] = data
            self._send(200)

        def do_POST(self):
            if not self._authorized():
                return
            body, base = self._body(), f"http://127.0.0.1:{self.server.server_port}"
            path = self.path.split("?")[0]
            if path == "/api/validate-yaml":  # the hub checks a README.md's metadata before the commit
                state.setdefault("validated", []).append(json.loads(body)["content"])
                return self._send(200, {"errors": [], "warnings": []})
            if path == "/api/repos/create":
                req = json.loads(body)
                repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                with lock:
                    if repo in state["repos"]:
                        return self._send(409, {"error": "You already created this model repo", "url": f"{base}/{repo}"})
                    state["repos"][repo] = {"private": req.get("visibility") == "private" or bool(req.get("private")),
                                            "branches": {"main": {"commit": "0" * 40, "files": {}}}}
                return self._send(200, {"url": f"{base}/{repo}"})
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(branch|preupload|commit)/(.+)", path)
            if m:
                repo, what, rev = m.group(1), m.group(2), m.group(3).replace("%2F", "/")
                if repo not in state["repos"]:
                    return self._send(404, {"error": "Repository not found"})
                branches = state["repos"][repo]["branches"]
                if what == "branch":
                    with lock:
                        if rev in branches:
                            return self._send(409, {"error": "Reference already exists"})
                        branches[rev] = json.loads(json.dumps(branches["main"]))
                    return self._send(200)
                if rev not in branches:
                    return self._send(404, {"error": f"Invalid rev id: {rev}"})
                if what == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [
                        {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                         "shouldIgnore": False} for f in files]})
                return self._commit(repo, rev, body, base)
            m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
            if m:
                objects = json.loads(body)["objects"]
                return self._send(200, {"transfer": "basic", "objects": [
                    {"oid": o["oid"], "size": o["size"],
                     "actions": {"upload": {"href": f"{base}/lfs-upload/{o['oid']}", "header": {}}}}
                    for o in objects]})
            self._send(404, {"error": f"no route {path}"})

        def _commit(self, repo: str, rev: str, body: bytes, base: str):
            files, header = {}, None
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "header":
                    header = item["value"]
                elif item["key"] == "file":
                    v = item["value"]
                    files[v["path"]] = base64.b64decode(v["content"]) if v.get("encoding") == "base64" else v["content"].encode()
                elif item["key"] == "lfsFile":
                    v = item["value"]
                    if v["oid"] not in state["lfs"]:
                        return self._send(400, {"error": f"LFS object {v['oid']} was not uploaded"})
                    files[v["path"]] = state["lfs"][v["oid"]]
            if header is None:
                return self._send(400, {"error": "no header"})
            with lock:
                branch = state["repos"][repo]["branches"][rev]
                branch["files"].update(files)
                oid = hashlib.sha1(json.dumps(sorted((p, hashlib.sha256(d).hexdigest()) for p, d in
                                                     branch["files"].items())).encode() + branch["commit"].encode()
                                   + str(len(state["requests"])).encode()).hexdigest()  # a commit is new, as on the hub
                branch["commit"], branch["summary"] = oid, header.get("summary")
            self._send(200, {"commitUrl": f"{base}/{repo}/commit/{oid}", "commitOid": oid})

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state
