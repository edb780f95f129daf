#!/usr/bin/env python3
"""The container contract, run for real: starts the release binary the way
the rendered Deployment runs it, and calls it as the kubelet and a caller
would.

    check_contract.py check-config NAME RENDERED.yaml DOCKERFILE BINARY WORKDIR
    check_contract.py contract NAME RENDERED.yaml DOCKERFILE BINARY WORKDIR

`check-config` runs only `oci-upstream check-config` on the rendered
config.toml, in the pod's filesystem; `contract` runs it and then serves.

Run by deploy/check as the first process of a network and PID namespace
of its own (`unshare --net --pid --fork --kill-child --mount-proc`), and
refuses to run anywhere else: the pod's own ports (0.0.0.0:50051...) are
used as the config says and collide with nothing on the machine, and
however this script ends, the kernel ends every process it started with
it. (bwrap's --die-with-parent cannot do that for the service: a parent
death signal is not delivered across the change to uid 65532.)

What is taken from the rendering, as the kubelet would:
  - argv: the container's command/args over the Dockerfile's
    ENTRYPOINT/CMD; the binary is bound at the ENTRYPOINT's path
    (/oci-upstream), as in the image;
  - env: the container's `env` (plain values), plus what the image and the
    runtime set (PATH, SSL_CERT_FILE and HOME of the distroless image,
    HOSTNAME);
  - the process: uid/gid from runAsUser/runAsGroup, fsGroup and
    supplementalGroups as its groups, no capabilities when they drop ALL,
    no_new_privs for allowPrivilegeEscalation: false, PID 1 of its own PID
    namespace (no init, like a container without one);
  - the filesystem (bubblewrap): a read-only root (the host's, read-only,
    standing in for the image) when readOnlyRootFilesystem; an empty
    read-only /tmp unless a volume is mounted there; every volumeMount at
    its mountPath: ConfigMap and Secret volumes read-only, in the kubelet's
    layout (files are links into ..data, mode defaultMode, group fsGroup),
    emptyDir writable, with the kubelet's ownership and mode (root:fsGroup,
    2777). Mount points under another volume are made in that volume, as
    the kubelet does.

What is changed, and why:
  - config.toml: in a copy for `serve`, only each upstream's `url`, which
    points at a CNCF Distribution registry this script starts on
    127.0.0.1 with a test image pushed; `check-config` reads the file as
    rendered.
  - Secret values: throwaway test ones. A Docker config (the docker-config
    auth file) with the test registry's credentials (it requires them, so a
    passing FetchManifest proves the credentials were read from the Secret);
    TLS files made with openssl (a CA and a server certificate for
    127.0.0.1); a random token for each caller's token_file.
  - Not emulated: seccomp, cgroup limits (the peak RSS is checked against
    limits.memory instead), the pod network (loopback in its own namespace),
    the kubelet's /etc/hosts and /etc/resolv.conf.

Then: check-config exits 0; `serve` starts; every probe's call
(grpc.health.v1.Health/Check on its port, with grpcurl and the checked-in
health.proto, as the kubelet calls it: no reflection, which health_listen
does not serve) answers SERVING; FetchManifest and FetchBlob (grpcurl
through the server's reflection, as users call it) return the pushed image
(over TLS with a caller's token when the config has [tls] and [[callers]],
and then a call without a token is Unauthenticated and a plaintext one
fails); GET /metrics answers and counts the calls; the cache volume holds
what was fetched; the peak RSS is below limits.memory; every log line is
JSON when log_format = "json";
SIGTERM ends the process with status 0 within the time the kubelet gives it
(terminationGracePeriodSeconds less the preStop sleep).
"""

from __future__ import annotations

import base64
import ctypes
import gzip
import hashlib
import io
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tarfile
import time
import tomllib
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_rendered import (  # noqa: E402
    Mount,
    Pod,
    load_objects,
    mount_holding,
    parse_quantity,
    secret_data,
    split_address,
)

DEPLOY = Path(__file__).resolve().parent
HEALTH_PROTO_DIR = DEPLOY / "testdata" / "proto"
HEALTH_PROTO = "grpc/health/v1/health.proto"
# The distroless image's environment (its config: Env and the nonroot
# user's home); HOSTNAME is the runtime's.
IMAGE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
    "HOME": "/home/nonroot",
}
IMAGE_DIRS = ["/home/nonroot"]
POD_HOSTNAME = "oci-upstream-7d9f8c6b5-check"
REGISTRY_ADDR = ("127.0.0.1", 5000)
REGISTRY_USER = "deploy-check"
TEST_REPO = "deploy-check/app"
TEST_TAG = "v1"
# The kubelet's timestamped dir in ConfigMap/Secret volumes.
ATOMIC_DIR = "..2026_01_01_00_00_00.000000000"


def log(message: str) -> None:
    print(f"  {message}", flush=True)


class ContractFailure(Exception):
    pass


def require(ok: bool, what: str, detail: str = "") -> None:
    if not ok:
        raise ContractFailure(f"{what}{': ' + detail if detail else ''}")
    log(f"ok    {what}")


# --- Peers ------------------------------------------------------------------


def die_with_parent() -> None:
    """In a child before exec: SIGKILL it when this script dies, however it dies."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def wait_port(addr: tuple[str, int], timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ContractFailure(f"process exited with {proc.returncode} before {addr} answered")
        try:
            socket.create_connection(addr, timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise ContractFailure(f"nothing listens on {addr[0]}:{addr[1]} after {timeout:g} s")


class Registry:
    """CNCF Distribution (Debian's docker-registry) on 127.0.0.1 behind
    htpasswd basic auth, with a small image pushed."""

    def __init__(self, workdir: Path, procs: list[subprocess.Popen]):
        self.dir = workdir / "registry"
        self.dir.mkdir()
        self.password = secrets.token_urlsafe(18)
        htpasswd = subprocess.run(
            ["htpasswd", "-Bbn", REGISTRY_USER, self.password], check=True, capture_output=True, text=True
        ).stdout
        (self.dir / "htpasswd").write_text(htpasswd)
        host, port = REGISTRY_ADDR
        (self.dir / "config.yml").write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.dir / 'data'}\n"
            f"http:\n  addr: {host}:{port}\n  secret: deploy-check\n"
            f"auth:\n  htpasswd:\n    realm: deploy-check\n    path: {self.dir / 'htpasswd'}\n"
        )
        self.log = open(self.dir / "log", "w")
        self.proc = subprocess.Popen(
            ["docker-registry", "serve", str(self.dir / "config.yml")],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        procs.append(self.proc)
        wait_port(REGISTRY_ADDR, 20, self.proc)
        self.url = f"http://{host}:{port}"
        self.host = f"{host}:{port}"

    def _request(self, method: str, url: str, body: bytes = b"", content_type: str | None = None):
        request = urllib.request.Request(url, data=body if method in ("POST", "PUT") else None, method=method)
        token = base64.b64encode(f"{REGISTRY_USER}:{self.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        if content_type:
            request.add_header("Content-Type", content_type)
        return urllib.request.urlopen(request, timeout=10)

    def push_blob(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with self._request("POST", f"{self.url}/v2/{TEST_REPO}/blobs/uploads/") as r:
            location = urllib.parse.urljoin(self.url, r.headers["Location"])
        sep = "&" if "?" in location else "?"
        with self._request("PUT", f"{location}{sep}digest={urllib.parse.quote(digest)}", data,
                           "application/octet-stream") as r:
            assert r.status == 201, r.status
        return digest

    def push_image(self) -> dict:
        """A one-layer OCI image; returns its manifest, digest and layer."""
        layer_tar = io.BytesIO()
        with tarfile.open(fileobj=layer_tar, mode="w") as tar:
            content = b"pushed by deploy/check\n"
            info = tarfile.TarInfo("hello.txt")
            info.size, info.mtime, info.mode = len(content), 0, 0o644
            tar.addfile(info, io.BytesIO(content))
        layer = gzip.compress(layer_tar.getvalue(), mtime=0)
        diff_id = "sha256:" + hashlib.sha256(layer_tar.getvalue()).hexdigest()
        config = json.dumps({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }).encode()
        layer_digest, config_digest = self.push_blob(layer), self.push_blob(config)
        manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": layer_digest, "size": len(layer)}],
        }).encode()
        with self._request("PUT", f"{self.url}/v2/{TEST_REPO}/manifests/{TEST_TAG}", manifest,
                           "application/vnd.oci.image.manifest.v1+json") as r:
            assert r.status == 201, r.status
        return {"manifest": manifest, "digest": "sha256:" + hashlib.sha256(manifest).hexdigest(),
                "layer": layer, "layer_digest": layer_digest}


class TestPki:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""

    def __init__(self, workdir: Path):
        self.dir = workdir / "pki"
        self.dir.mkdir()
        d = self.dir

        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
                "-subj", "/CN=deploy-check CA",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        openssl("req", *ec, "-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=oci-upstream")
        (d / "ext.cnf").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost,DNS:oci-upstream\n"
        )
        openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "1", "-out", "tls.crt", "-extfile", "ext.cnf")
        self.ca, self.cert, self.key = (d / n for n in ("ca.crt", "tls.crt", "tls.key"))


# --- The pod's volumes and sandbox --------------------------------------------


def write_atomic_volume(root: Path, files: dict[str, bytes], mode: int, gid: int | None) -> None:
    """A ConfigMap/Secret volume as the kubelet writes it: the files in a
    timestamped dir, `..data` linking to it, and each file a link through
    `..data`."""
    root.mkdir(parents=True)
    data_dir = root / ATOMIC_DIR
    data_dir.mkdir()
    for name, content in files.items():
        path = data_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        os.chmod(path, mode)
        if gid is not None:
            os.chown(path, 0, gid)
    (root / "..data").symlink_to(ATOMIC_DIR)
    for top in {name.split("/")[0] for name in files}:
        (root / top).symlink_to(f"..data/{top}")
    for d in [root, data_dir, *[p for p in data_dir.rglob("*") if p.is_dir()]]:
        os.chmod(d, 0o2755 if gid is not None else 0o755)
        if gid is not None:
            os.chown(d, 0, gid)


class Sandbox:
    """Builds the volumes of one run and the bwrap/setpriv command around argv."""

    def __init__(self, pod: Pod, workdir: Path, config_text: str, secret_values: dict[str, dict[str, bytes]]):
        self.pod = pod
        self.dir = workdir
        self.dir.mkdir()
        sec = pod.effective_security()
        self.fs_group = sec["fsGroup"]
        self.binds: list[tuple[str, str, bool]] = []  # (host path, mount path, writable)
        self.cache_host: Path | None = None
        mounts = sorted(pod.mounts, key=lambda m: len(PurePosixPath(m.path).parts))
        host_of: dict[str, Path] = {}
        for i, m in enumerate(mounts):
            host = self.dir / f"vol-{i}-{m.name}"
            if m.sub_path:
                raise ContractFailure(f"volume mount {m.name}: subPath mounts are not emulated")
            if m.kind == "configMap":
                data = dict(self._configmap(m))
                if m is pod.config_mount:
                    data[pod.config_key] = config_text
                files = self._project(m, {k: v.encode() for k, v in data.items()})
                write_atomic_volume(host, files, m.volume["configMap"].get("defaultMode", 0o644), self.fs_group)
            elif m.kind == "secret":
                name = m.volume["secret"]["secretName"]
                files = self._project(m, secret_values.get(name, {}))
                write_atomic_volume(host, files, m.volume["secret"].get("defaultMode", 0o644), self.fs_group)
            elif m.kind == "emptyDir":
                host.mkdir()
                os.chown(host, 0, self.fs_group if self.fs_group is not None else 0)
                os.chmod(host, 0o2777 if self.fs_group is not None else 0o777)
                if m.path == pod.cache_dir:
                    self.cache_host = host
            else:
                raise ContractFailure(f"volume {m.name}: {m.kind} volumes are not emulated")
            # A mount point inside another volume is made in that volume (the
            # kubelet's nested mount points).
            for other in reversed(mounts[:i]):
                op = PurePosixPath(other.path)
                if op in PurePosixPath(m.path).parents:
                    inner = host_of[other.path] / PurePosixPath(m.path).relative_to(op)
                    inner.mkdir(parents=True, exist_ok=True)
                    break
            host_of[m.path] = host
            self.binds.append((str(host), m.path, m.kind == "emptyDir" and not m.read_only))

    def _configmap(self, m: Mount) -> dict[str, str]:
        name = m.volume["configMap"]["name"]
        for o in self.pod.objects:
            if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name:
                return o.get("data") or {}
        raise ContractFailure(f"ConfigMap {name} is not in the rendering")

    @staticmethod
    def _project(m: Mount, data: dict[str, bytes]) -> dict[str, bytes]:
        source = m.volume.get(m.kind) or {}
        if source.get("items") is None:
            return data
        return {item["path"]: data[item["key"]] for item in source["items"] if item["key"] in data}

    def root_fs_args(self, binary: Path, entrypoint: str) -> list[str]:
        """The read-only root: the host's entries bound read-only, except the
        paths that lead to a mount point on the root filesystem, which are
        rebuilt on a tmpfs that is made read-only last."""
        nested = {p for _, p, _ in self.binds if any(
            PurePosixPath(o) in PurePosixPath(p).parents for _, o, _ in self.binds)}
        targets = list(dict.fromkeys(
            [p for _, p, _ in self.binds if p not in nested] + IMAGE_DIRS + ["/tmp", entrypoint]))
        args = ["--tmpfs", "/"]

        def leads_to(path: str) -> bool:
            return any(t == path or path in map(str, PurePosixPath(t).parents) for t in targets)

        def mirror(directory: str) -> None:
            for entry in sorted(os.listdir(directory)):
                path = os.path.join(directory, entry)
                if path in ("/proc", "/dev", "/tmp") or path in targets:
                    continue
                if leads_to(path) and os.path.isdir(path) and not os.path.islink(path):
                    args.extend(["--dir", path])
                    mirror(path)
                elif os.path.islink(path):
                    args.extend(["--symlink", os.readlink(path), path])
                else:
                    args.extend(["--ro-bind", path, path])

        mirror("/")
        for t in targets:
            if t != entrypoint:
                args.extend(["--dir", t])
        args.extend(["--ro-bind", str(binary), entrypoint])
        for host, path, writable in self.binds:
            args.extend(["--bind" if writable else "--ro-bind", host, path])
        args.extend(["--proc", "/proc", "--dev", "/dev"])
        if self.pod.effective_security()["readOnlyRootFilesystem"]:
            args.extend(["--remount-ro", "/"])
        return args

    def command(self, binary: Path, argv: list[str], info_fd: int | None = None) -> list[str]:
        pod = self.pod
        sec = pod.effective_security()
        env = {**IMAGE_ENV, "HOSTNAME": POD_HOSTNAME, **pod.env}
        cmd = ["bwrap", "--unshare-pid", "--as-pid-1", "--unshare-ipc", "--unshare-uts",
               "--hostname", POD_HOSTNAME, "--die-with-parent", "--new-session", "--clearenv"]
        for k, v in env.items():
            cmd.extend(["--setenv", k, v])
        cmd.extend(["--chdir", pod.container.get("workingDir", IMAGE_ENV["HOME"])])
        if info_fd is not None:
            cmd.extend(["--info-fd", str(info_fd)])
        cmd.extend(self.root_fs_args(binary, argv[0]))
        groups = [g for g in [sec["fsGroup"], *sec["supplementalGroups"]] if g is not None]
        priv = ["setpriv", f"--reuid={sec['runAsUser']}", f"--regid={sec['runAsGroup']}"]
        priv.append(f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups")
        if "ALL" in (sec["capabilities"].get("drop") or []):
            priv.extend(["--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all"])
        if sec["allowPrivilegeEscalation"] is False:
            priv.append("--no-new-privs")
        return cmd + ["--", *priv, *argv]


# --- Calls ---------------------------------------------------------------


def grpcurl(args: list[str], timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run(["grpcurl", *args], capture_output=True, text=True, timeout=timeout)


def json_stream(text: str) -> list[dict]:
    """The JSON objects grpcurl prints one after another."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return out
        obj, i = decoder.raw_decode(text, i)
        out.append(obj)


def probe_call(probe: dict) -> subprocess.CompletedProcess:
    grpc = probe["grpc"]
    args = ["-plaintext", "-connect-timeout", "1", "-max-time", str(probe.get("timeoutSeconds", 1)),
            "-import-path", str(HEALTH_PROTO_DIR), "-proto", HEALTH_PROTO]
    if grpc.get("service"):
        args.extend(["-d", json.dumps({"service": grpc["service"]})])
    return grpcurl([*args, f"127.0.0.1:{grpc['port']}", "grpc.health.v1.Health/Check"], timeout=10)


def serving(result: subprocess.CompletedProcess) -> bool:
    return result.returncode == 0 and '"SERVING"' in result.stdout


def in_own_namespaces() -> bool:
    """PID 1 of a PID namespace whose /proc is its own, with only `lo` in
    its network namespace: what deploy/check's unshare makes."""
    names = [line.split(":")[0].strip() for line in Path("/proc/net/dev").read_text().splitlines()[2:]]
    return os.getpid() == 1 and Path("/proc/self").resolve().name == "1" and names == ["lo"]


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run(mode: str, name: str, rendered: Path, dockerfile: Path, binary: Path, workdir: Path) -> None:
    procs: list[subprocess.Popen] = []
    try:
        _run(mode, name, rendered, dockerfile, binary, workdir, procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_secrets(pod: Pod, pki: TestPki, registry: Registry | None) -> tuple[dict, dict]:
    """The Secrets' data: what the rendering holds, then a throwaway value
    for every file the config names. Returns the values and the caller tokens."""
    values: dict[str, dict[str, bytes]] = {
        o["metadata"]["name"]: secret_data(o) for o in pod.objects if o["kind"] == "Secret"}
    tokens: dict[str, str] = {}
    password = registry.password if registry else "unused"
    host = registry.host if registry else "registry.invalid"
    for cf in pod.files():
        held = mount_holding(cf.path, pod.mounts)
        if held is None or held[0].kind != "secret":
            raise ContractFailure(f"{cf.field} {cf.path} is not on a Secret volume")
        mount, relative = held
        key = mount.key_for(relative)
        secret = values.setdefault(mount.volume["secret"]["secretName"], {})
        if cf.kind == "docker-config":
            auth = base64.b64encode(f"{REGISTRY_USER}:{password}".encode()).decode()
            secret[key] = json.dumps({"auths": {host: {"auth": auth}}}).encode()
        elif cf.kind == "password":
            secret[key] = password.encode() + b"\n"
        elif cf.kind == "tls-cert":
            secret[key] = pki.cert.read_bytes()
        elif cf.kind == "tls-key":
            secret[key] = pki.key.read_bytes()
        elif cf.kind == "tls-client-ca":
            secret[key] = pki.ca.read_bytes()
        elif cf.kind == "caller-token":
            tokens[cf.path] = secrets.token_urlsafe(24)
            secret[key] = tokens[cf.path].encode() + b"\n"
        else:
            raise ContractFailure(f"{cf.field}: no test value for a {cf.kind} file (the test registry "
                                  "speaks plain HTTP with basic auth)")
    return values, tokens


def _run(mode: str, name: str, rendered: Path, dockerfile: Path, binary: Path, workdir: Path,
         procs: list[subprocess.Popen]) -> None:
    if not in_own_namespaces():
        raise SystemExit("check_contract.py runs as the first process of namespaces of its own: "
                         "unshare --net --pid --fork --kill-child --mount-proc (deploy/check does)")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    pod = Pod(load_objects(rendered), dockerfile)
    sec = pod.effective_security()
    print(f"{name}: {' '.join(pod.argv)} as {sec['runAsUser']}:{sec['runAsGroup']} in a "
          f"{'read-only' if sec['readOnlyRootFilesystem'] else 'writable'} root with {len(pod.mounts)} volumes",
          flush=True)
    pki = TestPki(workdir)
    registry = None
    if mode == "contract":
        registry = Registry(workdir, procs)
        image = registry.push_image()
        log(f"ok    registry on {registry.url} (htpasswd auth) holds {TEST_REPO}:{TEST_TAG} {image['digest']}")
    secret_values, tokens = test_secrets(pod, pki, registry)

    # check-config, on the config as rendered, with every volume in place.
    sandbox = Sandbox(pod, workdir / "check-config", pod.config_text, secret_values)
    result = subprocess.run(sandbox.command(binary, [pod.argv[0], "check-config", pod.config_path]),
                            capture_output=True, text=True, timeout=60)
    require(result.returncode == 0, f"check-config {pod.config_path} in the pod's filesystem",
            (result.stdout + result.stderr).strip())
    log(f"      {result.stdout.strip()}")
    if registry is None:
        return

    # serve, on a copy whose upstream urls point at the test registry.
    config_text = pod.config_text
    for u in pod.config.get("upstreams") or []:
        pattern = re.compile(r'^(\s*url\s*=\s*)"' + re.escape(u["url"]) + r'"', re.M)
        config_text, n = pattern.subn(lambda m: m.group(1) + f'"{registry.url}"', config_text)
        if n == 0:
            raise ContractFailure(f"could not find upstream {u['name']}'s url line to point it at the test registry")

    def without_urls(text: str) -> dict:
        config = tomllib.loads(text)
        for u in config.get("upstreams") or []:
            u["url"] = "-"
        return config

    require(without_urls(config_text) == without_urls(pod.config_text),
            f"the serve config differs from the rendered one in upstream urls only (now {registry.url})")

    sandbox = Sandbox(pod, workdir / "serve", config_text, secret_values)
    read_fd, write_fd = os.pipe()
    stdout = open(workdir / "serve.stdout", "w+")
    stderr = open(workdir / "serve.stderr", "w+")
    started = time.monotonic()
    proc = subprocess.Popen(sandbox.command(binary, pod.argv, info_fd=write_fd), pass_fds=(write_fd,),
                            stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                            preexec_fn=die_with_parent)
    procs.append(proc)
    os.close(write_fd)
    with os.fdopen(read_fd) as info:
        # bwrap writes {"child-pid": N, ...} over a few lines, then closes it.
        pid = json.loads(info.read())["child-pid"]

    def logs() -> str:
        stderr.flush()
        return Path(stderr.name).read_text()

    try:
        _calls(pod, proc, pid, started, image, pki, tokens, sandbox, logs)
    except ContractFailure as e:
        raise ContractFailure(f"{e}\n--- the service's log (end) ---\n{logs()[-4000:]}") from None


def _calls(pod, proc, pid, started, image, pki, tokens, sandbox, logs) -> None:
    probes = pod.probes()
    # Readiness as the kubelet waits for it: within the startup probe's budget.
    startup = probes.get("startupProbe") or probes["readinessProbe"]
    budget = min(60, startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3))
    deadline = time.monotonic() + budget
    while True:
        if proc.poll() is not None:
            raise ContractFailure(f"serve exited with {proc.returncode} before it was ready")
        if serving(probe_call(probes["readinessProbe"])):
            break
        if time.monotonic() > deadline:
            raise ContractFailure(f"the readiness probe did not answer SERVING within {budget} s")
        time.sleep(0.2)
    log(f"ok    ready after {time.monotonic() - started:.1f} s")
    for kind, probe in probes.items():
        result = probe_call(probe)
        require(serving(result), f"{kind}: grpc.health.v1.Health/Check on port {probe['grpc']['port']} "
                                 "answers SERVING", result.stdout + result.stderr)

    _, listen_port = split_address(pod.listen)
    target = f"127.0.0.1:{listen_port}"
    tls = pod.config.get("tls")
    transport = ["-cacert", str(pki.ca)] if tls else ["-plaintext"]
    if tls and tls.get("client_ca_file"):
        raise ContractFailure("mTLS (tls.client_ca_file) is not exercised: no client certificate is made")
    auth: list[str] = []
    callers = pod.config.get("callers") or []
    if callers:
        caller = next((c for c in callers if c.get("token_file")
                       and "**" in c.get("repositories", ["**"]) and not c.get("exclude")), None)
        if caller is None:
            raise ContractFailure(f"no caller with a token_file may read {TEST_REPO}")
        auth = ["-H", f"authorization: Bearer {tokens[caller['token_file']]}"]
    request = json.dumps({"repository": TEST_REPO, "reference": TEST_TAG})

    result = grpcurl([*transport, *auth, "-d", request, target, "oci.upstream.v1.UpstreamService/FetchManifest"])
    answer = json.loads(result.stdout) if result.returncode == 0 else {}
    require(answer.get("digest") == image["digest"]
            and base64.b64decode(answer.get("manifest", "")) == image["manifest"],
            f"FetchManifest {TEST_REPO}:{TEST_TAG} on {'TLS' if tls else 'plaintext'} gRPC"
            f"{' with the token of caller ' + caller['name'] if callers else ''} "
            f"returns the pushed manifest from upstream {answer.get('source', {}).get('upstream')!r}",
            result.stdout + result.stderr)
    blob_request = json.dumps({"repository": TEST_REPO, "digest": image["layer_digest"]})
    result = grpcurl([*transport, *auth, "-d", blob_request, target, "oci.upstream.v1.UpstreamService/FetchBlob"])
    data = b"".join(base64.b64decode(m.get("data", "")) for m in json_stream(result.stdout)) \
        if result.returncode == 0 else b""
    require(data == image["layer"], "FetchBlob streams the pushed layer (stored in the cache volume)",
            result.stdout[-500:] + result.stderr)
    if callers:
        result = grpcurl([*transport, "-d", request, target, "oci.upstream.v1.UpstreamService/FetchManifest"])
        require("Unauthenticated" in result.stdout + result.stderr, "a call without a token is Unauthenticated",
                result.stdout + result.stderr)
    if tls:
        result = grpcurl(["-plaintext", "-d", request, target, "oci.upstream.v1.UpstreamService/FetchManifest"])
        require(result.returncode != 0, "a plaintext call to the TLS port fails", result.stdout)

    if pod.metrics_listen:
        _, metrics_port = split_address(pod.metrics_listen)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            body, ctype = r.read().decode(), r.headers.get("Content-Type", "")
        handled = [line for line in body.splitlines() if line.startswith("grpc_server_handled_total{")
                   and 'grpc_method="FetchManifest"' in line and 'grpc_code="OK"' in line]
        require(ctype.startswith("text/plain") and handled and float(handled[0].split()[-1]) >= 1
                and "oci_upstream_build_info" in body,
                f"GET /metrics on {metrics_port} answers ({ctype}) and counts the FetchManifest")

    written = [p for p in sandbox.cache_host.rglob("*") if p.is_file()] if sandbox.cache_host else []
    require(bool(written), f"the cache volume at {pod.cache_dir} holds {len(written)} files")
    limit = ((pod.container.get("resources") or {}).get("limits") or {}).get("memory")
    rss = peak_rss(pid)
    if limit:
        require(rss < parse_quantity(limit), f"peak RSS {rss / 2**20:.0f} MiB < limits.memory {limit}")

    # SIGTERM, as the kubelet sends it after the preStop hook, with what is
    # left of the grace period.
    budget = pod.termination_grace_s - pod.prestop_sleep_s
    os.kill(pid, signal.SIGTERM)
    t0 = time.monotonic()
    try:
        code = proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        raise ContractFailure(f"still running {budget} s after SIGTERM (the kubelet would SIGKILL it)") from None
    require(code == 0, f"SIGTERM: exit status 0 after {time.monotonic() - t0:.1f} s "
                       f"(the kubelet allows {budget} s)", f"status {code}")
    if pod.config.get("log_format") == "json":
        lines = [line for line in logs().splitlines() if line.strip()]
        bad = []
        for line in lines:
            try:
                json.loads(line)
            except json.JSONDecodeError:
                bad.append(line)
        require(lines and not bad, f"{len(lines)} log lines on stderr, every one JSON", "\n".join(bad[:5]))


def main(argv: list[str]) -> int:
    if len(argv) != 6 or argv[0] not in ("check-config", "contract"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    mode, name, rendered, dockerfile, binary, workdir = argv
    # SIGTERM/SIGINT (deploy/check's trap) unwind through the finally blocks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        run(mode, name, Path(rendered), Path(dockerfile), Path(binary).resolve(), Path(workdir))
    except ContractFailure as e:
        print(f"  FAIL  {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
