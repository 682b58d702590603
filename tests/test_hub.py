"""`--model org/name[@revision]` against a loopback stand-in for the Hugging Face hub (HF_ENDPOINT):
the real huggingface_hub download path, the cache reused, revisions, and one-line errors offline and for
a missing repo. Every run is a subprocess, because huggingface_hub reads its environment at import."""
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import urllib.parse

import pytest
import torch

from model import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = "rlsp-test/tiny-qwen"


def git_blob_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture
def hub(tiny_qwen, tiny_llama):
    """The hub's API as huggingface_hub reads it: revision info, the file tree, and resolve URLs with the
    commit and ETag headers. `main` is the tiny Qwen2 folder, revision `v1` the tiny Llama one; the
    safetensors files are LFS files (sha256 ETag), the others git blobs."""
    folders = {"main": tiny_qwen, "v1": tiny_llama}
    commits = {name: hashlib.sha1(name.encode()).hexdigest() for name in folders}
    by_commit = {sha: folders[name] for name, sha in commits.items()}
    requests = []

    def resolve(rev):
        return (commits.get(rev) or (rev if rev in by_commit else None))

    def entry(folder, name):
        data = open(os.path.join(folder, name), "rb").read()
        e = {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)}
        if name.endswith(".safetensors"):
            e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return e, data

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def send(self, code, body=b"", headers=(), head=False):
            self.send_response(code)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def not_found(self, what, head):
            self.send(404, json.dumps({"error": f"{what} not found"}).encode(),
                      [("X-Error-Code", what), ("Content-Type", "application/json")], head)

        def do_HEAD(self):
            self.do_GET(head=True)

        def do_GET(self, head=False):
            path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
            requests.append((self.command, path))
            api = f"/api/models/{REPO}/"
            if path.startswith("/api/models/") and not path.startswith(api):
                return self.not_found("RepoNotFound", head)
            if path.startswith(api + "revision/"):
                sha = resolve(path[len(api + "revision/"):])
                if sha is None:
                    return self.not_found("RevisionNotFound", head)
                files = sorted(os.listdir(by_commit[sha]))
                body = {"id": REPO, "modelId": REPO, "sha": sha, "private": False,
                        "siblings": [{"rfilename": f} for f in files]}
                return self.send(200, json.dumps(body).encode(), [("Content-Type", "application/json")], head)
            if path.startswith(api + "tree/"):
                sha = resolve(path[len(api + "tree/"):].strip("/"))
                if sha is None:
                    return self.not_found("RevisionNotFound", head)
                folder = by_commit[sha]
                body = [entry(folder, f)[0] for f in sorted(os.listdir(folder))]
                return self.send(200, json.dumps(body).encode(), [("Content-Type", "application/json")], head)
            prefix = f"/{REPO}/resolve/"
            if path.startswith(prefix):
                rev, _, name = path[len(prefix):].partition("/")
                sha = resolve(rev)
                if sha is None:
                    return self.not_found("RevisionNotFound", head)
                if not os.path.isfile(os.path.join(by_commit[sha], name)):
                    return self.not_found("EntryNotFound", head)
                e, data = entry(by_commit[sha], name)
                etag = e["lfs"]["oid"] if "lfs" in e else e["oid"]
                return self.send(200, data, [("X-Repo-Commit", sha), ("ETag", f'"{etag}"'),
                                             ("Content-Type", "application/octet-stream")], head)
            return self.not_found("RepoNotFound", head)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests, commits
    server.shutdown()


def run(code_or_cmd, env, cwd=ROOT):
    cmd = code_or_cmd if isinstance(code_or_cmd, list) else [sys.executable, "-c", code_or_cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)


def hub_env(endpoint, home, offline=False):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


FOLDER = "import sys; sys.path.insert(0, '.'); from model import local_folder; print(local_folder(sys.argv[1]))"


def test_hub_id_downloads_once_then_reads_the_cache(hub, tiny_qwen, tiny_llama, tmp_path):
    endpoint, requests, commits = hub
    env = hub_env(endpoint, tmp_path / "hf")
    p = run([sys.executable, "eval.py", "--model", REPO, "--data", "gsm8k", "--limit", "2", "--max-new-tokens", "8",
             "--out", str(tmp_path / "eval")], env)
    assert p.returncode == 0, p.stderr[-2000:]
    got = [path for method, path in requests if method == "GET" and "/resolve/" in path]
    assert f"/{REPO}/resolve/{commits['main']}/model.safetensors" in got
    # the files sit in the standard cache, byte for byte, and load with the local folder's numbers
    p = run([sys.executable, "-c", FOLDER, REPO], env)
    folder = p.stdout.strip()
    assert folder.startswith(str(tmp_path / "hf")) and commits["main"] in folder
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert open(os.path.join(folder, name), "rb").read() == open(os.path.join(tiny_qwen, name), "rb").read()
    ids = torch.randint(0, 700, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(Transformer.from_pretrained(folder, device="cpu")(ids),
                           Transformer.from_pretrained(tiny_qwen, device="cpu")(ids))
    # a second run downloads nothing again; offline it needs no hub at all
    n = len(requests)
    assert run([sys.executable, "-c", FOLDER, REPO], env).stdout.strip() == folder
    assert not [path for method, path in requests[n:] if "/resolve/" in path]
    n = len(requests)
    p = run([sys.executable, "-c", FOLDER, REPO], hub_env(endpoint, tmp_path / "hf", offline=True))
    assert p.stdout.strip() == folder and len(requests) == n
    # a revision is another commit's files
    p = run([sys.executable, "-c", FOLDER, f"{REPO}@v1"], env)
    assert p.returncode == 0, p.stderr[-2000:]
    config = json.load(open(os.path.join(p.stdout.strip(), "config.json")))
    assert config["architectures"] == ["LlamaForCausalLM"] and commits["v1"] in p.stdout


@pytest.mark.parametrize("model,offline,message", [
    (REPO, True, f"error: '{REPO}': no such folder here, not in the Hugging Face cache"),
    ("nobody/no-such-model", False, "error: 'nobody/no-such-model': no such folder here, and no model nobody/no-such-model"),
    (f"{REPO}@v9", False, f"error: {REPO}@v9: the hub (http://127.0.0.1:"),
])
def test_hub_errors_are_one_line(hub, tmp_path, model, offline, message):
    endpoint, _, _ = hub
    p = run([sys.executable, "train.py", "--stage", "sft", "--model", model, "--out", str(tmp_path / "run")],
            hub_env(endpoint, tmp_path / "empty-cache", offline))
    assert p.returncode == 1 and p.stderr.startswith(message), p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1
    if offline:
        assert "HF_HUB_OFFLINE is set" in p.stderr and "hf download" in p.stderr


def test_a_path_like_name_is_never_a_hub_id(hub, tmp_path, monkeypatch):
    """A mistyped or unmounted local folder ("models/qwen" where ./models exists, "./qwen", "~/qwen") fails as
    a missing folder and asks the hub for nothing, though "models/qwen" has a hub id's shape."""
    import model as model_module
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    asked = []
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **kw: asked.append(a) or str(tmp_path))
    for name in ("models/qwen", "./qwen", "../qwen", "~/qwen", "/nowhere/qwen", "org/../qwen"):
        assert model_module.local_folder(name) == name
        with pytest.raises(FileNotFoundError, match="does not exist"):
            Transformer.from_pretrained(name)
    assert asked == []
    assert model_module.local_folder("org/qwen") == str(tmp_path) and len(asked) == 1  # a real hub id still goes


def test_shard_names_stay_inside_the_model_folder(tiny_llama, tmp_path):
    import shutil
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama, folder)
    (tmp_path / "evil.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    keys = list(Transformer.from_pretrained(str(folder)).state_dict())
    for shard in ("../evil.safetensors", str(tmp_path / "evil.safetensors"), ".."):
        json.dump({"weight_map": {k: shard for k in keys}}, open(folder / "model.safetensors.index.json", "w"))
        with pytest.raises(ValueError, match="is not a file name in the model folder"):
            Transformer.from_pretrained(str(folder))
