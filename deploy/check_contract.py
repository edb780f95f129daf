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
  - env: the container's `env` (plain values, and Secret keys with the
    test values below), plus what the image and the runtime set (PATH,
    SSL_CERT_FILE and HOME of the distroless image, HOSTNAME);
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
    the kubelet does. /etc/hosts is the kubelet's (localhost, the pod's
    hostname), plus the S3 endpoint's host name (see below).

What is changed, and why:
  - config.toml: in a copy for `serve`, only each upstream's `url`, which
    points at a CNCF Distribution registry this script starts on
    127.0.0.1 (port 5000, or the next one free when a listener of the pod
    takes it, as mirror_listen = "0.0.0.0:5000" does) with a test image
    pushed; `check-config` reads the file as
    rendered.
  - Secret values: throwaway test ones. A Docker config (the docker-config
    auth file) with the test registry's credentials (it requires them, so a
    passing FetchManifest proves the credentials were read from the Secret);
    TLS files made with openssl (a CA and a server certificate for
    127.0.0.1); a random token for each caller's token_file; for
    AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, the keys of the S3 user
    below; a random value for any other variable from a Secret.
  - The S3 endpoint (cache.backend = "s3"): moto's S3 (moto_server, with a
    fix to its signature check, see MOTO_SERVER) takes its place, on the
    endpoint's port at 127.0.0.2, which the pod's /etc/hosts gives the
    endpoint's host name in place of the cluster's DNS; the config's
    [cache.s3] is used as rendered. The bucket is created and
    overlays/s3/lifecycle.json applied to it; then moto checks every
    request's signature and permissions, for an IAM user whose only policy
    is overlays/s3/iam-policy.json. So the service gets through only with
    the Secret's keys, signing right, and with no permission beyond that
    policy. https endpoints, virtual-hosted-style requests and temporary
    credentials (AWS_SESSION_TOKEN) are not emulated.
  - Not emulated: seccomp, cgroup limits (the peak RSS is checked against
    limits.memory instead), the pod network (loopback in its own namespace),
    the kubelet's /etc/resolv.conf.

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

With cache.backend = "s3", also: the policy file grants exactly s3:ListBucket,
GetObject, PutObject, DeleteObject and AbortMultipartUpload on the config's
bucket and prefix, and moto refuses an unknown key; FetchBlob streams a blob
large enough for a multipart upload too; afterwards the bucket holds, for
the manifest, the layer and that blob, <prefix>sha256/<hex>/data with the
object's size and bytes and the empty holder record
<prefix>sha256/<hex>/holders/<upstream>/<repository>, and nothing else under
the prefix; /metrics shows no oci_upstream_cache_backend_errors_total
{backend="s3"}, and the log says the bucket answers and never that it
failed. Then a second replica (fresh volumes) starts with the registry
stopped, and serves the manifest by digest and both blobs as cache hits from
the bucket, still without backend errors. Then the endpoint stops answering
(moto is stopped: connections are refused; a bucket that times out is not
emulated) and the registry is back: the probes still answer SERVING, a blob
new to the cache streams from the registry, the failures are counted in
oci_upstream_cache_backend_errors_total{backend="s3"}, and SIGTERM still ends
the process with status 0 in time. Not exercised: DeleteObject and
AbortMultipartUpload (eviction, a download that fails its digest).

With mirror_listen (the OCI HTTP mirror), also, on its port over plain
HTTP and with a caller's token when the config has [[callers]] (then
GET /v2/ without one is 401 UNAUTHORIZED with a Bearer challenge): GET /v2/
answers 200 with Docker-Distribution-API-Version: registry/2.0; a second
image, pushed for the mirror alone, is pulled as containerd asks for it
(`?ns=` the registry's host:port, which the upstreams answer for by
default): its manifest and layer come back with their Docker-Content-Digest
and bytes, from the registry (oci_upstream_registry_requests_total grows),
and a Range of the layer is 206 with that span; an ns no upstream lists is
404 NAME_UNKNOWN; skopeo copies the first image through the mirror, byte
for byte; a containerd of its own (no CRI) fetches it through a
certs.d/<registry>/hosts.toml as deploy/README.md gives nodes (the token as
a static header), holding no credentials for the registry, which requires
them, so only the mirror can have served it; and /metrics counts the
requests in oci_upstream_http_requests_total by route, method and code.
"""

from __future__ import annotations

import base64
import ctypes
import gzip
import hashlib
import io
import ipaddress
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
import urllib.error
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
# Where the S3 endpoint's host name points in the pod's /etc/hosts, and moto
# listens (any loopback address is on `lo`).
S3_ADDR = "127.0.0.2"
S3_USER = "oci-upstream"
# What overlays/s3 gives users to apply to the bucket: the service's IAM
# policy (the contract's S3 user has exactly it) and the lifecycle rule.
S3_OVERLAY = DEPLOY / "kubernetes" / "overlays" / "s3"
S3_ACTIONS = {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"}
# A blob at least this large goes to the bucket as a multipart upload
# (src/cache/shared.rs, PART_SIZE); the contract pushes one a bit larger.
S3_PART_SIZE = 8 * 1024 * 1024
# moto_server (moto.server.main) with one fix: to check a signature, moto
# signs the request again from its URL with the query string decoded
# (prefix=a/ where the client signed prefix=a%2F, as SigV4 wants), so every
# listing by prefix failed. The fix encodes the query again, as SigV4 does.
MOTO_SERVER = """
import sys
from urllib.parse import quote, unquote, urlsplit
from moto.iam import access_control
from moto.server import main

create = access_control.IAMRequestBase._create_aws_request


def encode(part):
    return quote(unquote(part), safe="-_.~")


def create_aws_request(self):
    request = create(self)
    url = urlsplit(request.url)
    if url.query:
        pairs = (pair.partition("=") for pair in url.query.split("&"))
        request.url = url._replace(query="&".join(f"{encode(k)}={encode(v)}" for k, _, v in pairs)).geturl()
    return request


access_control.IAMRequestBase._create_aws_request = create_aws_request
main(sys.argv[1:])
"""
# The test registry's address: 127.0.0.1 on the first of these ports that no
# listener of the pod takes (a mirror_listen of 0.0.0.0:5000 does).
REGISTRY_HOST = "127.0.0.1"
REGISTRY_PORTS = (5000, 5001, 5002)
REGISTRY_USER = "deploy-check"
TEST_REPO = "deploy-check/app"
TEST_TAG = "v1"
# An image only the OCI HTTP mirror asks for (when mirror_listen is on), so
# that it comes from the registry through the mirror, not from the cache.
MIRROR_TAG = "mirror"
# The kubelet's timestamped dir in ConfigMap/Secret volumes.
ATOMIC_DIR = "..2026_01_01_00_00_00.000000000"
# The kubelet's /etc/hosts (the pod's IP is loopback here: its network
# namespace has only `lo`).
KUBELET_HOSTS = """# Kubernetes-managed hosts file.
127.0.0.1\tlocalhost
::1\tlocalhost ip6-localhost ip6-loopback
fe00::0\tip6-localnet
fe00::0\tip6-mcastprefix
fe00::1\tip6-allnodes
fe00::2\tip6-allrouters
127.0.0.1\t{hostname}
"""


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

    def __init__(self, workdir: Path, procs: list[subprocess.Popen], taken: set[int]):
        self.addr = (REGISTRY_HOST, next(p for p in REGISTRY_PORTS if p not in taken))
        self.dir = workdir / "registry"
        self.dir.mkdir()
        self.password = secrets.token_urlsafe(18)
        htpasswd = subprocess.run(
            ["htpasswd", "-Bbn", REGISTRY_USER, self.password], check=True, capture_output=True, text=True
        ).stdout
        (self.dir / "htpasswd").write_text(htpasswd)
        host, port = self.addr
        (self.dir / "config.yml").write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.dir / 'data'}\n"
            f"http:\n  addr: {host}:{port}\n  secret: deploy-check\n"
            f"auth:\n  htpasswd:\n    realm: deploy-check\n    path: {self.dir / 'htpasswd'}\n"
        )
        self.log = open(self.dir / "log", "w")
        self.procs = procs
        self.start()
        self.url = f"http://{host}:{port}"
        self.host = f"{host}:{port}"

    def start(self) -> None:
        """Starts the registry (again, after stop(): on the same data)."""
        self.proc = subprocess.Popen(
            ["docker-registry", "serve", str(self.dir / "config.yml")],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        self.procs.append(self.proc)
        wait_port(self.addr, 20, self.proc)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()

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

    def push_image(self, tag: str = TEST_TAG, content: bytes = b"pushed by deploy/check\n") -> dict:
        """A one-layer OCI image; returns its manifest, digest and layer."""
        layer_tar = io.BytesIO()
        with tarfile.open(fileobj=layer_tar, mode="w") as tar:
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
        with self._request("PUT", f"{self.url}/v2/{TEST_REPO}/manifests/{tag}", manifest,
                           "application/vnd.oci.image.manifest.v1+json") as r:
            assert r.status == 201, r.status
        return {"manifest": manifest, "digest": "sha256:" + hashlib.sha256(manifest).hexdigest(),
                "layer": layer, "layer_digest": layer_digest}


class S3Server:
    """moto (`moto_server`) in place of the S3 endpoint of [cache.s3]: on
    the endpoint's port, at an address the pod's /etc/hosts gives the
    endpoint's host name. The bucket is created, lifecycle.json applied,
    and an IAM user made whose only permissions are iam-policy.json's; then
    moto checks every request's signature and permissions, so the service
    gets through only with that user's keys, from the Secret."""

    def __init__(self, s3: dict, workdir: Path, procs: list[subprocess.Popen]):
        import botocore.session  # moto's own dependency
        from botocore.config import Config

        endpoint = s3.get("endpoint") or ""
        if not endpoint:
            raise ContractFailure("cache.s3.endpoint is empty (AWS S3 itself): no endpoint to stand in for")
        url = urllib.parse.urlsplit(endpoint)
        if url.scheme != "http":
            raise ContractFailure(f"cache.s3.endpoint {endpoint}: only http endpoints are emulated")
        if s3.get("virtual_hosted_style"):
            raise ContractFailure("virtual_hosted_style = true is not emulated (bucket.host names)")
        # Keys start with the prefix's segments (src/config/s3.rs).
        segments = [part for part in s3.get("prefix", "oci-upstream/").split("/") if part]
        self.bucket, self.prefix = s3["bucket"], "".join(f"{part}/" for part in segments)
        self.region = s3.get("region", "us-east-1")
        port = url.port or 80
        try:
            literal = ipaddress.ip_address(url.hostname)
        except ValueError:
            literal = None
        self.hosts: dict[str, str] = {}
        if literal is None:
            addr = S3_ADDR
            self.hosts[url.hostname] = addr
        else:
            addr = str(literal)
            if not literal.is_loopback:
                subprocess.run(["ip", "addr", "add", f"{addr}/{literal.max_prefixlen}", "dev", "lo"], check=True)
        self.dir = workdir / "s3"
        self.dir.mkdir()
        self.log = open(self.dir / "log", "w")
        # Path-style requests to this endpoint: moto would take the first
        # label of a name like minio.storage.svc for a bucket otherwise.
        env = {**os.environ, "MOTO_S3_CUSTOM_ENDPOINTS": endpoint.rstrip("/")}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", MOTO_SERVER, "-H", addr, "-p", str(port)],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            env=env, preexec_fn=die_with_parent,
        )
        procs.append(self.proc)
        wait_port((addr, port), 30, self.proc)
        self.url = f"http://{f'[{addr}]' if ':' in addr else addr}:{port}"
        session = botocore.session.get_session()

        def client(service: str, key: str, secret: str):
            return session.create_client(
                service, region_name=self.region, endpoint_url=self.url,
                aws_access_key_id=key, aws_secret_access_key=secret,
                config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))

        # Set up while moto checks nothing yet (its default).
        iam = client("iam", "setup", "setup")
        iam.create_user(UserName=S3_USER)
        key = iam.create_access_key(UserName=S3_USER)["AccessKey"]
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        policy = json.loads((S3_OVERLAY / "iam-policy.json").read_text())
        granted = {a for st in policy["Statement"] for a in st["Action"]}
        resources = {r for st in policy["Statement"] for r in st["Resource"]}
        require(granted == S3_ACTIONS and {f"arn:aws:s3:::{self.bucket}",
                                           f"arn:aws:s3:::{self.bucket}/{self.prefix}*"} == resources,
                f"iam-policy.json grants {', '.join(sorted(S3_ACTIONS))} on bucket {self.bucket!r} "
                f"and keys under {self.prefix!r}", f"{sorted(granted)} on {sorted(resources)}")
        iam.put_user_policy(UserName=S3_USER, PolicyName="oci-upstream", PolicyDocument=json.dumps(policy))
        request = urllib.request.Request(f"{self.url}/{self.bucket}", data=b"", method="PUT",
                                         headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.status == 200, r.status
        setup = client("s3", "setup", "setup")
        setup.put_bucket_lifecycle_configuration(
            Bucket=self.bucket, LifecycleConfiguration=json.loads((S3_OVERLAY / "lifecycle.json").read_text()))
        rules = setup.get_bucket_lifecycle_configuration(Bucket=self.bucket)["Rules"]
        require(any(r.get("Status") == "Enabled"
                    and r.get("AbortIncompleteMultipartUpload", {}).get("DaysAfterInitiation")
                    and self.prefix.startswith(r.get("Filter", {}).get("Prefix", r.get("Prefix", "")))
                    for r in rules),
                f"lifecycle.json applies: the bucket aborts incomplete multipart uploads under {self.prefix!r}",
                json.dumps(rules, default=str))
        # From now on, every request needs a valid signature and permission.
        request = urllib.request.Request(f"{self.url}/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.status == 200, r.status
        self.s3 = client("s3", self.key_id, self.secret)
        refused = ""
        try:
            client("s3", "AKIAUNKNOWNKEY000000", "wrong").list_objects_v2(Bucket=self.bucket)
        except Exception as e:  # botocore's ClientError
            refused = str(e)
        require("InvalidAccessKeyId" in refused or "403" in refused,
                f"moto on {self.url} for {endpoint} holds bucket {self.bucket!r} and refuses unknown keys",
                refused or "an unknown key was let in")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def objects(self) -> dict[str, int]:
        """Every key under the prefix, with its size (ListObjectsV2:
        GET /bucket?list-type=2&prefix=...)."""
        out: dict[str, int] = {}
        args = {"Bucket": self.bucket, "Prefix": self.prefix}
        while True:
            page = self.s3.list_objects_v2(**args)
            out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
            if not page.get("IsTruncated"):
                return out
            args["ContinuationToken"] = page["NextContinuationToken"]

    def get(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def data_key(self, digest: str) -> str:
        algorithm, hex_digest = digest.split(":", 1)
        return f"{self.prefix}{algorithm}/{hex_digest}/data"

    def holder_key(self, digest: str, upstream: str, repository: str) -> str:
        return self.data_key(digest).removesuffix("data") + f"holders/{upstream}/{repository}"


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

    def __init__(self, pod: Pod, workdir: Path, config_text: str, secret_values: dict[str, dict[str, bytes]],
                 hosts: dict[str, str] | None = None):
        self.pod = pod
        self.dir = workdir
        self.dir.mkdir()
        # env from Secrets, as the kubelet resolves secretKeyRef when the
        # container starts.
        self.secret_env: dict[str, str] = {}
        for var, ref in pod.env_secrets.items():
            value = secret_values.get(ref["name"], {}).get(ref["key"])
            if value is None:
                raise ContractFailure(f"env {var}: Secret {ref['name']} has no key {ref['key']}")
            self.secret_env[var] = value.decode()
        # /etc/hosts as the kubelet writes it, plus the names `hosts` maps
        # (standing in for the cluster's DNS).
        hosts_file = self.dir / "hosts"
        hosts_file.write_text(KUBELET_HOSTS.format(hostname=POD_HOSTNAME)
                              + "".join(f"{ip}\t{name}\n" for name, ip in (hosts or {}).items()))
        self.files: list[tuple[str, str]] = [(str(hosts_file), "/etc/hosts")]  # (host file, path), read-only
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
        files = [entrypoint, *(path for _, path in self.files)]
        targets = list(dict.fromkeys(
            [p for _, p, _ in self.binds if p not in nested] + IMAGE_DIRS + ["/tmp", *files]))
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
            if t not in files:
                args.extend(["--dir", t])
        args.extend(["--ro-bind", str(binary), entrypoint])
        for host, path in self.files:
            args.extend(["--ro-bind", host, path])
        for host, path, writable in self.binds:
            args.extend(["--bind" if writable else "--ro-bind", host, path])
        args.extend(["--proc", "/proc", "--dev", "/dev"])
        if self.pod.effective_security()["readOnlyRootFilesystem"]:
            args.extend(["--remount-ro", "/"])
        return args

    def command(self, binary: Path, argv: list[str], info_fd: int | None = None) -> list[str]:
        pod = self.pod
        sec = pod.effective_security()
        env = {**IMAGE_ENV, "HOSTNAME": POD_HOSTNAME, **pod.env, **self.secret_env}
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


def test_secrets(pod: Pod, pki: TestPki, registry: Registry | None,
                 s3: S3Server | None) -> tuple[dict, dict]:
    """The Secrets' data: what the rendering holds, then a throwaway value
    for every file the config names and every variable taken from a Secret
    (the S3 user's keys for the AWS ones). Returns the values and the
    caller tokens."""
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
    for var, ref in pod.env_secrets.items():
        secret = values.setdefault(ref["name"], {})
        if var == "AWS_ACCESS_KEY_ID":
            secret[ref["key"]] = (s3.key_id if s3 else "unused").encode()
        elif var == "AWS_SECRET_ACCESS_KEY":
            secret[ref["key"]] = (s3.secret if s3 else "unused").encode()
        elif var == "AWS_SESSION_TOKEN":
            raise ContractFailure("env AWS_SESSION_TOKEN: temporary credentials are not emulated")
        else:
            secret[ref["key"]] = secrets.token_urlsafe(24).encode()
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
    s3 = None
    if mode == "contract":
        taken = {split_address(a)[1] for a in (pod.listen, pod.metrics_listen, pod.health_listen,
                                                pod.mirror_listen) if a}
        registry = Registry(workdir, procs, taken)
        image = registry.push_image()
        log(f"ok    registry on {registry.url} (htpasswd auth) holds {TEST_REPO}:{TEST_TAG} {image['digest']}")
        if pod.mirror_listen:
            image["mirror"] = registry.push_image(MIRROR_TAG, b"pulled through the mirror by deploy/check\n")
            log(f"ok    and {TEST_REPO}:{MIRROR_TAG} {image['mirror']['digest']}, for the mirror only")
        if pod.shared_cache is not None:
            s3 = S3Server(pod.shared_cache, workdir, procs)
            # Large enough for a multipart upload to the bucket.
            image["big"] = os.urandom(S3_PART_SIZE + 1024 * 1024)
            image["big_digest"] = registry.push_blob(image["big"])
            log(f"ok    registry holds a {len(image['big']) // 2**20} MiB blob {image['big_digest']} as well")
    secret_values, tokens = test_secrets(pod, pki, registry, s3)
    hosts = s3.hosts if s3 else {}

    # check-config, on the config as rendered, with every volume in place.
    sandbox = Sandbox(pod, workdir / "check-config", pod.config_text, secret_values, hosts)
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

    first = Serve(pod, binary, workdir, "serve", config_text, secret_values, hosts, procs)
    try:
        _calls(pod, first, image, registry, pki, tokens, s3)
    except ContractFailure as e:
        raise ContractFailure(f"{e}\n--- the service's log (end) ---\n{first.logs()[-4000:]}") from None
    if s3 is None:
        return
    # Another replica, or this one rescheduled: an empty cache volume, and
    # no upstream to fall back on. What it serves comes from the bucket.
    registry.stop()
    second = Serve(pod, binary, workdir, "serve-2", config_text, secret_values, hosts, procs)
    try:
        _from_bucket(pod, second, image, pki, tokens, s3, registry)
    except ContractFailure as e:
        raise ContractFailure(f"{e}\n--- the second replica's log (end) ---\n{second.logs()[-4000:]}") from None


class Serve:
    """One `serve` process in a sandbox of its own (fresh volumes)."""

    def __init__(self, pod: Pod, binary: Path, workdir: Path, name: str, config_text: str,
                 secret_values: dict, hosts: dict[str, str], procs: list[subprocess.Popen]):
        self.name = name
        self.sandbox = Sandbox(pod, workdir / name, config_text, secret_values, hosts)
        read_fd, write_fd = os.pipe()
        self.stdout = open(workdir / f"{name}.stdout", "w+")
        self.stderr = open(workdir / f"{name}.stderr", "w+")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.sandbox.command(binary, pod.argv, info_fd=write_fd), pass_fds=(write_fd,),
                                     stdin=subprocess.DEVNULL, stdout=self.stdout, stderr=self.stderr,
                                     preexec_fn=die_with_parent)
        procs.append(self.proc)
        os.close(write_fd)
        with os.fdopen(read_fd) as info:
            # bwrap writes {"child-pid": N, ...} over a few lines, then closes it.
            self.pid = json.loads(info.read())["child-pid"]

    def logs(self) -> str:
        self.stderr.flush()
        return Path(self.stderr.name).read_text()


def wait_ready(pod: Pod, serve: Serve) -> None:
    probes = pod.probes()
    # Readiness as the kubelet waits for it: within the startup probe's budget.
    startup = probes.get("startupProbe") or probes["readinessProbe"]
    budget = min(60, startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3))
    deadline = time.monotonic() + budget
    while True:
        if serve.proc.poll() is not None:
            raise ContractFailure(f"serve exited with {serve.proc.returncode} before it was ready")
        if serving(probe_call(probes["readinessProbe"])):
            break
        if time.monotonic() > deadline:
            raise ContractFailure(f"the readiness probe did not answer SERVING within {budget} s")
        time.sleep(0.2)
    log(f"ok    ready after {time.monotonic() - serve.started:.1f} s")
    for kind, probe in probes.items():
        result = probe_call(probe)
        require(serving(result), f"{kind}: grpc.health.v1.Health/Check on port {probe['grpc']['port']} "
                                 "answers SERVING", result.stdout + result.stderr)


class Client:
    """How a caller reaches the service: the address, TLS, a token."""

    def __init__(self, pod: Pod, pki: TestPki, tokens: dict[str, str]):
        _, listen_port = split_address(pod.listen)
        self.target = f"127.0.0.1:{listen_port}"
        self.tls = pod.config.get("tls")
        self.transport = ["-cacert", str(pki.ca)] if self.tls else ["-plaintext"]
        if self.tls and self.tls.get("client_ca_file"):
            raise ContractFailure("mTLS (tls.client_ca_file) is not exercised: no client certificate is made")
        self.auth: list[str] = []
        self.callers = pod.config.get("callers") or []
        self.caller = None
        if self.callers:
            self.caller = next((c for c in self.callers if c.get("token_file")
                                and "**" in c.get("repositories", ["**"]) and not c.get("exclude")), None)
            if self.caller is None:
                raise ContractFailure(f"no caller with a token_file may read {TEST_REPO}")
            self.auth = ["-H", f"authorization: Bearer {tokens[self.caller['token_file']]}"]

    def call(self, method: str, request: dict, with_token: bool = True) -> subprocess.CompletedProcess:
        return grpcurl([*self.transport, *(self.auth if with_token else []), "-d", json.dumps(request),
                        self.target, f"oci.upstream.v1.UpstreamService/{method}"])

    def manifest(self, reference: str) -> tuple[dict, str]:
        result = self.call("FetchManifest", {"repository": TEST_REPO, "reference": reference})
        return (json.loads(result.stdout) if result.returncode == 0 else {}), result.stdout + result.stderr

    def blob(self, digest: str) -> tuple[bytes, dict, str]:
        """The blob's bytes, its BlobInfo, and grpcurl's output (for errors)."""
        result = self.call("FetchBlob", {"repository": TEST_REPO, "digest": digest})
        messages = json_stream(result.stdout) if result.returncode == 0 else []
        data = b"".join(base64.b64decode(m.get("data", "")) for m in messages)
        info = next((m["info"] for m in messages if "info" in m), {})
        return data, info, result.stdout[-500:] + result.stderr


def scrape(pod: Pod) -> tuple[str, str]:
    _, metrics_port = split_address(pod.metrics_listen)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        return r.read().decode(), r.headers.get("Content-Type", "")


def samples(body: str, family: str) -> list[tuple[dict[str, str], float]]:
    """The samples of one metric in a text exposition: labels and value."""
    out = []
    for line in body.splitlines():
        if line.startswith(family + "{") or line.startswith(family + " "):
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', line.partition("{")[2].rpartition("}")[0]))
            out.append((labels, float(line.split()[-1])))
    return out


def s3_errors(body: str) -> dict[str, float]:
    """oci_upstream_cache_backend_errors_total{backend="s3",...}, by operation."""
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith("oci_upstream_cache_backend_errors_total{") and 'backend="s3"' in line:
            operation = re.search(r'operation="([^"]*)"', line)
            out[operation.group(1) if operation else "?"] = float(line.split()[-1])
    return out


def _calls(pod: Pod, serve: Serve, image: dict, registry: Registry, pki: TestPki, tokens: dict,
           s3: S3Server | None) -> None:
    wait_ready(pod, serve)
    client = Client(pod, pki, tokens)
    tls, callers, caller = client.tls, client.callers, client.caller

    answer, output = client.manifest(TEST_TAG)
    require(answer.get("digest") == image["digest"]
            and base64.b64decode(answer.get("manifest", "")) == image["manifest"],
            f"FetchManifest {TEST_REPO}:{TEST_TAG} on {'TLS' if tls else 'plaintext'} gRPC"
            f"{' with the token of caller ' + caller['name'] if callers else ''} "
            f"returns the pushed manifest from upstream {answer.get('source', {}).get('upstream')!r}",
            output)
    upstream = answer.get("source", {}).get("upstream", "")
    data, _, output = client.blob(image["layer_digest"])
    require(data == image["layer"], "FetchBlob streams the pushed layer (stored in the cache volume)", output)
    if s3 is not None:
        data, _, output = client.blob(image["big_digest"])
        require(data == image["big"], f"FetchBlob streams the {len(image['big']) // 2**20} MiB blob", output)
    if callers:
        result = client.call("FetchManifest", {"repository": TEST_REPO, "reference": TEST_TAG}, with_token=False)
        require("Unauthenticated" in result.stdout + result.stderr, "a call without a token is Unauthenticated",
                result.stdout + result.stderr)
    if tls:
        result = grpcurl(["-plaintext", "-d", json.dumps({"repository": TEST_REPO, "reference": TEST_TAG}),
                          client.target, "oci.upstream.v1.UpstreamService/FetchManifest"])
        require(result.returncode != 0, "a plaintext call to the TLS port fails", result.stdout)

    if s3 is not None:
        _in_bucket(s3, image, upstream)
    if pod.mirror_listen:
        _mirror(pod, serve, image, registry, client, tokens)

    if pod.metrics_listen:
        body, ctype = scrape(pod)
        handled = [line for line in body.splitlines() if line.startswith("grpc_server_handled_total{")
                   and 'grpc_method="FetchManifest"' in line and 'grpc_code="OK"' in line]
        require(ctype.startswith("text/plain") and handled and float(handled[0].split()[-1]) >= 1
                and "oci_upstream_build_info" in body,
                f"GET /metrics on {split_address(pod.metrics_listen)[1]} answers ({ctype}) "
                "and counts the FetchManifest")
        if s3 is not None:
            errors = s3_errors(body)
            require(not any(errors.values()), "no oci_upstream_cache_backend_errors_total{backend=\"s3\"}",
                    str(errors))
    if s3 is not None:
        log_text = serve.logs()
        require("the shared cache (S3) answers" in log_text and "the shared cache (S3) failed" not in log_text,
                "the log says the shared cache (S3) answers, and never that it failed")

    cache_files(pod, serve)
    limit = ((pod.container.get("resources") or {}).get("limits") or {}).get("memory")
    rss = peak_rss(serve.pid)
    if limit:
        require(rss < parse_quantity(limit), f"peak RSS {rss / 2**20:.0f} MiB < limits.memory {limit}")
    stop(pod, serve)


class MirrorClient:
    """A puller of the OCI HTTP mirror on mirror_listen, as a node's
    containerd is: plain HTTP, `?ns=` naming the registry it pulls for, the
    caller's token as `Authorization: Bearer` when the config has callers."""

    def __init__(self, pod: Pod, client: Client, tokens: dict[str, str]):
        _, port = split_address(pod.mirror_listen)
        self.address = f"127.0.0.1:{port}"
        self.token = tokens[client.caller["token_file"]] if client.caller else None

    def get(self, path: str, headers: dict[str, str] | None = None,
            with_token: bool = True) -> tuple[int, dict[str, str], bytes]:
        """Status, headers (lowercase names) and body; errors are answers too."""
        request = urllib.request.Request(f"http://{self.address}{path}", headers=headers or {})
        if self.token and with_token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=15) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def registry_requests(pod: Pod) -> dict[str, float] | None:
    """oci_upstream_registry_requests_total{status="2xx"} by operation
    (None without metrics_listen)."""
    if not pod.metrics_listen:
        return None
    out: dict[str, float] = {}
    for labels, value in samples(scrape(pod)[0], "oci_upstream_registry_requests_total"):
        if labels.get("status") == "2xx":
            out[labels.get("operation", "?")] = out.get(labels.get("operation", "?"), 0) + value
    return out


class Containerd:
    """A containerd of its own (no CRI, state under `dir`), pulling as a
    node's does: through the hosts.toml deploy/README.md gives nodes."""

    def __init__(self, dir: Path, procs: list[subprocess.Popen]):
        self.dir = dir
        dir.mkdir()
        self.socket = dir / "containerd.sock"
        disabled = ["io.containerd.grpc.v1.cri"] + [f"io.containerd.snapshotter.v1.{s}"
                                                    for s in ("aufs", "btrfs", "zfs", "devmapper")]
        (dir / "config.toml").write_text(
            f'version = 2\nroot = "{dir / "root"}"\nstate = "{dir / "state"}"\n'
            f"disabled_plugins = {json.dumps(disabled)}\n"
            f'[grpc]\naddress = "{self.socket}"\n[ttrpc]\naddress = "{dir / "ttrpc.sock"}"\n'
            f'[debug]\naddress = "{dir / "debug.sock"}"\n'
            f'[plugins."io.containerd.internal.v1.opt"]\npath = "{dir / "opt"}"\n')
        self.log = open(dir / "log", "w")
        self.proc = subprocess.Popen(["containerd", "--config", str(dir / "config.toml")],
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=die_with_parent)
        procs.append(self.proc)
        deadline = time.monotonic() + 30
        while self.ctr("version").returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise ContractFailure(f"containerd did not start: {(dir / 'log').read_text()[-2000:]}")
            time.sleep(0.2)

    def ctr(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ctr", "--address", str(self.socket), *args],
                              capture_output=True, text=True, timeout=60)

    def hosts(self, registry: str, origin: str, mirror: str, token: str | None) -> Path:
        """certs.d/<registry>/hosts.toml, as a node's /etc/containerd/certs.d holds it."""
        certs = self.dir / "certs.d"
        (certs / registry).mkdir(parents=True)
        text = f'server = "{origin}"\n\n[host."http://{mirror}"]\n  capabilities = ["pull", "resolve"]\n'
        if token:
            text += f'  [host."http://{mirror}".header]\n    authorization = "Bearer {token}"\n'
        (certs / registry / "hosts.toml").write_text(text)
        return certs

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def error_code(body: bytes) -> str:
    """The first code of a distribution API error body."""
    try:
        return json.loads(body)["errors"][0]["code"]
    except (ValueError, KeyError, IndexError, TypeError):
        return f"(not an error body: {body[:200]!r})"


def _mirror(pod: Pod, serve: Serve, image: dict, registry: Registry, client: Client,
            tokens: dict[str, str]) -> None:
    """The OCI HTTP mirror: the base endpoint, the pushed manifest and layer
    by plain HTTP as containerd asks for them (with `?ns=`), a range, an
    unknown namespace, skopeo copying the image through it, and the
    requests counted in /metrics."""
    mirror = MirrorClient(pod, client, tokens)
    by = f" with caller {client.caller['name']}'s token" if client.caller else ""
    if client.caller:
        status, headers, body = mirror.get("/v2/", with_token=False)
        require(status == 401 and headers.get("www-authenticate", "").startswith("Bearer ")
                and error_code(body) == "UNAUTHORIZED",
                "mirror: GET /v2/ without a token is 401 UNAUTHORIZED with a Bearer challenge",
                f"{status} {headers.get('www-authenticate')!r} {body[:200]!r}")
    status, headers, body = mirror.get("/v2/")
    require(status == 200 and headers.get("docker-distribution-api-version") == "registry/2.0",
            f"mirror: GET /v2/ on plain HTTP {mirror.address}{by} answers 200 with "
            "Docker-Distribution-API-Version: registry/2.0",
            f"{status} {headers} {body[:200]!r}")
    # What containerd sends for a registry host: `ns=host:port`. The serve
    # config points every upstream at the test registry, so by default they
    # answer for its host:port.
    upstreams = [u for u in pod.config.get("upstreams") or [] if u.get("enabled", True)]
    ns = ((upstreams[0].get("namespaces") if upstreams else None) or [registry.host])[0]
    query = "?" + urllib.parse.urlencode({"ns": ns})
    fresh = image["mirror"]
    before = registry_requests(pod)
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, "
                        "application/vnd.docker.distribution.manifest.v2+json"}
    status, headers, body = mirror.get(f"/v2/{TEST_REPO}/manifests/{MIRROR_TAG}{query}", accept)
    require(status == 200 and headers.get("docker-content-digest") == fresh["digest"] and body == fresh["manifest"]
            and headers.get("content-type") == "application/vnd.oci.image.manifest.v1+json",
            f"mirror: GET /v2/{TEST_REPO}/manifests/{MIRROR_TAG}{query} returns the pushed manifest, "
            f"Docker-Content-Digest {fresh['digest'][:19]}...",
            f"{status} {headers} {body[:200]!r}")
    status, headers, body = mirror.get(f"/v2/{TEST_REPO}/blobs/{fresh['layer_digest']}{query}")
    require(status == 200 and headers.get("docker-content-digest") == fresh["layer_digest"]
            and body == fresh["layer"],
            f"mirror: GET /v2/{TEST_REPO}/blobs/{fresh['layer_digest'][:19]}... returns its layer's "
            f"{len(fresh['layer'])} bytes and Docker-Content-Digest",
            f"{status} {headers} {len(body)} bytes")
    after = registry_requests(pod)
    if before is not None and after is not None:
        grew = {op: after.get(op, 0) - before.get(op, 0) for op in ("manifest", "blob")}
        require(all(n >= 1 for n in grew.values()),
                "mirror: both came from the registry (oci_upstream_registry_requests_total 2xx: "
                f"manifest +{grew['manifest']:g}, blob +{grew['blob']:g}), not from the cache", str(grew))
    status, headers, body = mirror.get(f"/v2/{TEST_REPO}/blobs/{fresh['layer_digest']}{query}",
                                       {"Range": "bytes=0-15"})
    require(status == 206 and body == fresh["layer"][:16]
            and headers.get("content-range") == f"bytes 0-15/{len(fresh['layer'])}",
            "mirror: the layer with Range: bytes=0-15 is 206 with those 16 bytes and Content-Range",
            f"{status} {headers} {body!r}")
    status, _, body = mirror.get(f"/v2/{TEST_REPO}/manifests/{TEST_TAG}?ns=registry.invalid", accept)
    require(status == 404 and error_code(body) == "NAME_UNKNOWN",
            "mirror: ?ns=registry.invalid (no upstream lists it) is 404 NAME_UNKNOWN, so containerd "
            "would go to that registry itself", f"{status} {body[:200]!r}")

    # skopeo pulls the image gRPC fetched through the mirror (one cache for
    # both; skopeo sends no ns, so every upstream may answer) into a dir:
    # layout, blob files named by digest.
    out = serve.sandbox.dir.parent / "skopeo"
    copy = ["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false", "--preserve-digests",
            *(["--src-registry-token", mirror.token] if mirror.token else []),
            f"docker://{mirror.address}/{TEST_REPO}:{TEST_TAG}", f"dir:{out}"]
    result = subprocess.run(copy, capture_output=True, text=True, timeout=120)
    manifest = (out / "manifest.json").read_bytes() if (out / "manifest.json").exists() else b""
    layer_file = out / image["layer_digest"].split(":", 1)[1]
    require(result.returncode == 0 and manifest == image["manifest"]
            and layer_file.exists() and layer_file.read_bytes() == image["layer"],
            f"skopeo copy docker://{mirror.address}/{TEST_REPO}:{TEST_TAG}{by} gets the pushed manifest "
            "and layer, byte for byte", (result.stdout + result.stderr).strip()[-2000:])

    # containerd, as on a node: the registry's hosts.toml names the mirror
    # (and the caller's token as a static header). The registry wants
    # credentials containerd does not have, so only the mirror can have
    # served what it fetched.
    containerd = Containerd(serve.sandbox.dir.parent / "containerd", [])
    try:
        certs = containerd.hosts(registry.host, registry.url, mirror.address, mirror.token)
        reference = f"{registry.host}/{TEST_REPO}:{TEST_TAG}"
        result = containerd.ctr("content", "fetch", "--hosts-dir", str(certs), reference)
        content = set(containerd.ctr("content", "ls", "-q").stdout.split())
    finally:
        containerd.stop()
    wanted_content = {image["digest"], image["layer_digest"]}
    require(result.returncode == 0 and wanted_content <= content,
            f"containerd fetches {reference} through certs.d/{registry.host}/hosts.toml "
            f"(server {registry.url}, host http://{mirror.address}{', a Bearer header' if mirror.token else ''}) "
            "with no credentials for the registry: the manifest and layer are in its content store",
            (result.stdout + result.stderr)[-2000:] + f"\ncontent: {sorted(content)}")

    if pod.metrics_listen:
        body, _ = scrape(pod)
        counted = {(labels.get("route"), labels.get("method"), labels.get("code")): value
                   for labels, value in samples(body, "oci_upstream_http_requests_total")}
        wanted = [("base", "GET", "200"), ("manifest", "GET", "200"), ("manifest", "HEAD", "200"),
                  ("blob", "GET", "200"), ("blob", "GET", "206"), ("manifest", "GET", "404")]
        if client.caller:
            wanted.append(("base", "GET", "401"))
        missing = [w for w in wanted if counted.get(w, 0) < 1]
        require(not missing,
                "/metrics counts them in oci_upstream_http_requests_total: "
                + ", ".join(f"{r} {m} {c}: {counted.get((r, m, c), 0):g}" for r, m, c in wanted),
                f"missing {missing}; counted {counted}")


def _in_bucket(s3: S3Server, image: dict, upstream: str) -> None:
    """What the calls left in the bucket: each object's data under
    <prefix>sha256/<hex>/data with its size and bytes, and its holder record
    <prefix>sha256/<hex>/holders/<upstream>/<repository>. Uploads run in the
    background after the calls: waits for them."""
    wanted = {"manifest": (image["digest"], image["manifest"]), "layer": (image["layer_digest"], image["layer"]),
              "multipart blob": (image["big_digest"], image["big"])}
    keys = {s3.data_key(d): len(b) for d, b in wanted.values()}
    keys.update({s3.holder_key(d, upstream, TEST_REPO): 0 for d, _ in wanted.values()})
    deadline = time.monotonic() + 20
    while True:
        found = s3.objects()
        if all(k in found for k in keys) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    for what, (digest, content) in wanted.items():
        key = s3.data_key(digest)
        require(found.get(key) == len(content) and s3.get(key) == content,
                f"the bucket holds the {what} at {key} ({len(content)} bytes)",
                f"size {found.get(key)}; under the prefix: {sorted(found)}")
        holder = s3.holder_key(digest, upstream, TEST_REPO)
        require(found.get(holder) == 0, f"and its holder record {holder.removeprefix(key.removesuffix('data'))}",
                f"under the prefix: {sorted(found)}")
    stray = sorted(set(found) - set(keys))
    require(not stray, f"nothing else under {s3.prefix} ({len(found)} keys)", ", ".join(stray))


def _from_bucket(pod: Pod, serve: Serve, image: dict, pki: TestPki, tokens: dict, s3: S3Server,
                 registry: Registry) -> None:
    """A second replica with an empty cache volume, the registry gone:
    serves the manifest by digest and the blobs from the bucket. Then the
    bucket goes and the registry is back: it serves from the registry."""
    log("      a second replica: an empty cache volume, the registry stopped")
    wait_ready(pod, serve)
    client = Client(pod, pki, tokens)
    answer, output = client.manifest(image["digest"])
    require(answer.get("digest") == image["digest"] and answer.get("source", {}).get("cacheHit") is True
            and base64.b64decode(answer.get("manifest", "")) == image["manifest"],
            f"FetchManifest {TEST_REPO}@{image['digest'][:19]}... is a cache hit from the bucket", output)
    for what, digest, content in (("layer", image["layer_digest"], image["layer"]),
                                  (f"{len(image['big']) // 2**20} MiB blob", image["big_digest"], image["big"])):
        data, info, output = client.blob(digest)
        require(data == content and info.get("source", {}).get("cacheHit") is True,
                f"FetchBlob streams the {what} from the bucket (a cache hit)", output)
    if pod.metrics_listen:
        errors = s3_errors(scrape(pod)[0])
        require(not any(errors.values()), "no oci_upstream_cache_backend_errors_total{backend=\"s3\"}",
                str(errors))
    cache_files(pod, serve)

    log("      the bucket's endpoint stops answering (connections refused), the registry is back")
    s3.stop()
    registry.start()
    fresh = os.urandom(256 * 1024)
    digest = registry.push_blob(fresh)
    t0 = time.monotonic()
    data, info, output = client.blob(digest)
    took = time.monotonic() - t0
    require(data == fresh and not info.get("source", {}).get("cacheHit"),
            f"FetchBlob streams a blob new to the cache from the registry, in {took:.1f} s", output)
    for kind, probe in pod.probes().items():
        result = probe_call(probe)
        require(serving(result), f"{kind} still answers SERVING", result.stdout + result.stderr)
    if pod.metrics_listen:
        errors = s3_errors(scrape(pod)[0])
        require(sum(errors.values()) >= 1, "the failures count in oci_upstream_cache_backend_errors_total"
                f"{{backend=\"s3\"}} ({', '.join(f'{k}: {v:g}' for k, v in sorted(errors.items()))})", str(errors))
    stop(pod, serve)


def cache_files(pod: Pod, serve: Serve) -> None:
    host = serve.sandbox.cache_host
    written = [p for p in host.rglob("*") if p.is_file()] if host else []
    require(bool(written), f"the cache volume at {pod.cache_dir} holds {len(written)} files")


def stop(pod: Pod, serve: Serve) -> None:
    """SIGTERM, as the kubelet sends it after the preStop hook, with what is
    left of the grace period; then the log's format."""
    budget = pod.termination_grace_s - pod.prestop_sleep_s
    os.kill(serve.pid, signal.SIGTERM)
    t0 = time.monotonic()
    try:
        code = serve.proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        raise ContractFailure(f"still running {budget} s after SIGTERM (the kubelet would SIGKILL it)") from None
    require(code == 0, f"SIGTERM: exit status 0 after {time.monotonic() - t0:.1f} s "
                       f"(the kubelet allows {budget} s)", f"status {code}")
    if pod.config.get("log_format") == "json":
        lines = [line for line in serve.logs().splitlines() if line.strip()]
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
