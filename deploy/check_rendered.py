#!/usr/bin/env python3
"""Structural checks of deploy/: the Dockerfile, and what kustomize renders.

    check_rendered.py dockerfile DOCKERFILE CARGO_TOML
    check_rendered.py rendered NAME RENDERED.yaml DOCKERFILE CARGO_TOML

`rendered` reads one `kustomize build` output (the base, an overlay, or
either with optional components) and asserts what the pods need to work as
the config says: the config file the container reads comes from a generated
ConfigMap; probe, container, Service and NetworkPolicy ports agree with the
config's listen addresses; the OCI HTTP mirror's container port and Service
port `mirror` exist exactly when mirror_listen is on, and ingress admits it
from an address block (nodes' containerd is no pod); the security context; the cache volume at
cache.dir with room above cache.max_size; the grace period above the drain
time; every file the config names is on a Secret or ConfigMap volume (never
a subPath mount); environment variables are plain values or Secret keys
that exist, and the AWS credential variables never plain values; no
ConfigMap holds a Secret's value, a credential key or an AWS access key id;
with cache.backend = "s3", a [cache.s3] bucket and no unknown key, an
endpoint without credentials in it (allow_http for http), the access key
pair from one Secret (or, with IRSA's ServiceAccount annotation, no static
key to override the role), and egress to the endpoint's port; HPA, PDB,
topology spread and labels. deploy/check runs it for every rendering;
check_contract.py then runs the pod for real with the helpers below.

Each assertion prints when it fails (all of them with DEPLOY_CHECK_VERBOSE=1).
Values are parsed as the service parses them (humantime durations,
bytesize sizes) and as Kubernetes does (quantities), so "8GiB" and "10Gi"
compare right. Exit status 1 lists every failed assertion.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

# The service's defaults (README, Configuration) for the keys checked here.
DEFAULT_LISTEN = "0.0.0.0:50051"
DEFAULT_METRICS_LISTEN = "0.0.0.0:9090"
DEFAULT_SHUTDOWN_GRACE = "20s"
DEFAULT_CACHE_DIR = "/var/cache/oci-upstream"
DEFAULT_CACHE_MAX_SIZE = "20GiB"
# After shutdown_grace the service takes at most this long to exit.
EXIT_AFTER_GRACE_S = 5
# Environment variables the service reads (src/config/mod.rs).
CONFIG_ENV = "OCI_UPSTREAM_CONFIG"
LISTEN_ENV = "OCI_UPSTREAM_LISTEN"
CACHE_DIR_ENV = "OCI_UPSTREAM_CACHE_DIR"
# The AWS environment the S3 client reads credentials from (object_store's
# AmazonS3Builder::from_env): secret material, so from a Secret, never a value.
AWS_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# The keys of [cache.s3] (src/config/s3.rs; it denies any other).
S3_KEYS = {"bucket", "prefix", "endpoint", "region", "allow_http", "virtual_hosted_style"}
# The ServiceAccount annotation EKS's pod identity webhook turns into web
# identity credentials (AWS_ROLE_ARN, AWS_WEB_IDENTITY_TOKEN_FILE).
IRSA_ANNOTATION = "eks.amazonaws.com/role-arn"
# What the pods must run as (DESIGN section 7).
RUN_AS = 65532
# Kinds that come from CRDs: kubernetes-validate has no schema for them.
CRD_KINDS = {"ServiceMonitor", "Certificate"}
SELECTOR_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance")


# --- Values, spelled as the service and Kubernetes spell them -------------

_HUMANTIME_UNITS = {
    **dict.fromkeys(("nanos", "nsec", "ns"), 1e-9),
    **dict.fromkeys(("usec", "us", "µs"), 1e-6),
    **dict.fromkeys(("millis", "msec", "ms"), 1e-3),
    **dict.fromkeys(("seconds", "second", "secs", "sec", "s"), 1),
    **dict.fromkeys(("minutes", "minute", "min", "mins", "m"), 60),
    **dict.fromkeys(("hours", "hour", "hr", "hrs", "h"), 3600),
    **dict.fromkeys(("days", "day", "d"), 86400),
    **dict.fromkeys(("weeks", "week", "wk", "wks", "w"), 604800),
    **dict.fromkeys(("months", "month", "M"), 2_630_016),
    **dict.fromkeys(("years", "year", "yr", "yrs", "y"), 31_557_600),
}


def parse_duration(text: str) -> float:
    """Seconds in a humantime duration ("20s", "1m 30s"), as the config reads it."""
    parts = re.findall(r"(\d+)\s*([a-zA-Zµ]+)", text)
    if not parts or re.sub(r"(\d+)\s*([a-zA-Zµ]+)", "", text).strip():
        raise ValueError(f"not a duration: {text!r}")
    total = 0.0
    for number, unit in parts:
        if unit not in _HUMANTIME_UNITS:
            raise ValueError(f"unknown duration unit {unit!r} in {text!r}")
        total += int(number) * _HUMANTIME_UNITS[unit]
    return total


_BYTESIZE_UNITS = {
    "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12, "p": 10**15, "pb": 10**15,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30,
    "gib": 2**30, "ti": 2**40, "tib": 2**40, "pi": 2**50, "pib": 2**50,
}


def parse_bytesize(text: str) -> int:
    """Bytes in a size as the bytesize crate reads it ("8GiB"; "8GB" is 8e9)."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    m = re.fullmatch(r"([0-9.]+)\s*([A-Za-z]+)", text)
    if not m or m.group(2).lower() not in _BYTESIZE_UNITS:
        raise ValueError(f"not a size: {text!r}")
    return int(float(m.group(1)) * _BYTESIZE_UNITS[m.group(2).lower()])


_QUANTITY_SUFFIXES = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}


def parse_quantity(value) -> float:
    """A Kubernetes resource quantity ("10Gi", "250m", "1e3") as a number."""
    text = str(value).strip()
    m = re.fullmatch(r"([+-]?[0-9.]+)([eE][+-]?\d+)?(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]?)", text)
    if not m:
        raise ValueError(f"not a quantity: {text!r}")
    number = float(m.group(1) + (m.group(2) or ""))
    return number * _QUANTITY_SUFFIXES[m.group(3)]


def split_address(text: str) -> tuple[str, int]:
    """("0.0.0.0", 50051) from "0.0.0.0:50051"; ("::", 50051) from "[::]:50051"."""
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:]+):(\d+)", text)
    if not m:
        raise ValueError(f"not a socket address: {text!r}")
    return (m.group(1), int(m.group(2))) if m.group(1) else (m.group(3), int(m.group(4)))


# --- The Dockerfile ---------------------------------------------------------


@dataclass
class Stage:
    """One build stage: its base image and its instructions (continuations joined)."""

    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, op: str) -> str | None:
        values = [arg for o, arg in self.instructions if o == op]
        return values[-1] if values else None

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]


def dockerfile_stages(path: Path) -> list[Stage]:
    """The stages of a Dockerfile, in order."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("#") and not pending:
            continue
        if raw.lstrip().startswith("#"):
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append(pending + raw)
        pending = ""
    stages: list[Stage] = []
    for line in lines:
        if not line.strip():
            continue
        op, _, arg = line.strip().partition(" ")
        op = op.upper()
        arg = arg.strip()
        if op == "FROM":
            words = arg.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image=words[0], name=name))
        elif stages:
            stages[-1].instructions.append((op, arg))
    return stages


def exec_form(arg: str | None) -> list[str] | None:
    """The list of an ENTRYPOINT/CMD in exec (JSON) form, else None."""
    if arg is None:
        return None
    try:
        value = json.loads(arg)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def image_defaults(dockerfile: Path) -> tuple[list[str], list[str]]:
    """The runtime stage's ENTRYPOINT and CMD (exec form), as a container
    without `command`/`args` runs them."""
    runtime = dockerfile_stages(dockerfile)[-1]
    entrypoint = exec_form(runtime.last("ENTRYPOINT")) or []
    cmd = exec_form(runtime.last("CMD")) or []
    return entrypoint, cmd


# --- The rendered objects and the pod they describe -----------------------


class Failures:
    """Collects assertion results; prints them as they come."""

    def __init__(self, name: str):
        self.name = name
        self.failed: list[str] = []
        self.passed = 0
        self.verbose = bool(os.environ.get("DEPLOY_CHECK_VERBOSE"))

    def check(self, ok: bool, what: str, why: str = "") -> bool:
        if ok:
            self.passed += 1
            if self.verbose:
                print(f"  ok    {what}")
        else:
            message = f"{what}: {why}" if why else what
            print(f"  FAIL  {message}")
            self.failed.append(message)
        return ok


def load_objects(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def labels_match(selector: dict | None, labels: dict) -> bool:
    """Whether a label selector (matchLabels, matchExpressions) selects `labels`."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def secret_data(secret: dict) -> dict[str, bytes]:
    """A Secret's keys and values (stringData wins over data, as the API server merges them)."""
    import base64

    out = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
    out.update({k: v.encode() for k, v in (secret.get("stringData") or {}).items()})
    return out


@dataclass
class Mount:
    """A volume mount of the container, with the volume it mounts."""

    path: str
    name: str
    read_only: bool
    sub_path: str | None
    volume: dict

    @property
    def kind(self) -> str:
        for kind in ("configMap", "secret", "emptyDir", "projected", "persistentVolumeClaim"):
            if kind in self.volume:
                return kind
        return next(iter(k for k in self.volume if k != "name"), "unknown")

    def key_for(self, relative: str) -> str | None:
        """The ConfigMap/Secret key a file `relative` to the mount holds."""
        source = self.volume.get(self.kind) or {}
        items = source.get("items")
        if items is None:
            return relative if "/" not in relative else None
        for item in items:
            if item["path"] == relative:
                return item["key"]
        return None


def mount_holding(path: str, mounts: list[Mount]) -> tuple[Mount, str] | None:
    """The deepest mount that `path` lies under, and the path relative to it."""
    best = None
    p = PurePosixPath(path)
    for m in mounts:
        mp = PurePosixPath(m.path)
        if p == mp or mp in p.parents:
            if best is None or len(mp.parts) > len(PurePosixPath(best.path).parts):
                best = m
    if best is None:
        return None
    return best, str(p.relative_to(best.path))


@dataclass
class ConfigFile:
    """A file the config names, and what kind of value it holds."""

    field: str
    path: str
    kind: str  # tls-cert, tls-key, tls-client-ca, caller-token, docker-config, password, token, ca


class Pod:
    """The one Deployment of a rendering, its container `oci-upstream`, and
    the config it reads, with the values the service would use."""

    def __init__(self, objects: list[dict], dockerfile: Path):
        self.objects = objects
        deployments = [o for o in objects if o["kind"] == "Deployment"]
        if len(deployments) != 1:
            raise SystemExit(f"expected one Deployment, found {len(deployments)}")
        self.deployment = deployments[0]
        self.template = self.deployment["spec"]["template"]
        self.spec = self.template["spec"]
        self.labels = self.template["metadata"].get("labels") or {}
        containers = [c for c in self.spec["containers"] if c["name"] == "oci-upstream"]
        if len(containers) != 1:
            raise SystemExit("the Deployment has no container named oci-upstream")
        self.container = containers[0]
        volumes = {v["name"]: v for v in self.spec.get("volumes") or []}
        self.mounts = [
            Mount(
                path=m["mountPath"].rstrip("/") or "/",
                name=m["name"],
                read_only=bool(m.get("readOnly")),
                sub_path=m.get("subPath") or m.get("subPathExpr"),
                volume=volumes[m["name"]],
            )
            for m in self.container.get("volumeMounts") or []
        ]
        entrypoint, cmd = image_defaults(dockerfile)
        # Kubernetes: `command` replaces ENTRYPOINT (and drops CMD); `args` replaces CMD.
        if "command" in self.container:
            self.argv = list(self.container["command"]) + list(self.container.get("args") or [])
        else:
            self.argv = entrypoint + list(self.container.get("args", cmd))
        self.env: dict[str, str] = {}
        # Variables from a Secret's key (valueFrom.secretKeyRef): name -> the ref.
        self.env_secrets: dict[str, dict] = {}
        self.env_unsupported: list[str] = []
        for e in self.container.get("env") or []:
            if "value" in e:
                self.env[e["name"]] = str(e["value"])
            elif "secretKeyRef" in (e.get("valueFrom") or {}):
                self.env_secrets[e["name"]] = e["valueFrom"]["secretKeyRef"]
            elif "valueFrom" in e:
                self.env_unsupported.append(e["name"])
            else:
                self.env[e["name"]] = ""
        if self.container.get("envFrom"):
            self.env_unsupported.append("envFrom")
        self.config_path = self._config_path()
        self.config_mount, self.config_key, self.config_map = self._config_source()
        self.config_text = self.config_map["data"][self.config_key]
        self.config = tomllib.loads(self.config_text)

    def _config_path(self) -> str:
        args = self.argv[1:]
        for i, a in enumerate(args):
            if a == "--config" and i + 1 < len(args):
                return args[i + 1]
            if a.startswith("--config="):
                return a.split("=", 1)[1]
        if CONFIG_ENV in self.env:
            return self.env[CONFIG_ENV]
        raise SystemExit(f"the container names no config file (--config or {CONFIG_ENV}): {self.argv}")

    def _config_source(self) -> tuple[Mount, str, dict]:
        held = mount_holding(self.config_path, self.mounts)
        if held is None or held[0].kind != "configMap":
            raise SystemExit(f"{self.config_path} is not on a ConfigMap volume")
        mount, relative = held
        key = mount.key_for(relative)
        name = mount.volume["configMap"]["name"]
        maps = [o for o in self.objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name]
        if not maps or key not in (maps[0].get("data") or {}):
            raise SystemExit(f"ConfigMap {name} with key {key} (for {self.config_path}) is not in the rendering")
        return mount, key, maps[0]

    # The values the service uses: the file, then the environment overrides.
    @property
    def listen(self) -> str:
        return self.env.get(LISTEN_ENV) or self.config.get("listen", DEFAULT_LISTEN)

    @property
    def metrics_listen(self) -> str | None:
        return self.config.get("metrics_listen", DEFAULT_METRICS_LISTEN) or None

    @property
    def health_listen(self) -> str | None:
        return self.config.get("health_listen") or None

    @property
    def mirror_listen(self) -> str | None:
        """The OCI HTTP mirror's address; None when off (absent or "")."""
        return self.config.get("mirror_listen") or None

    @property
    def shutdown_grace_s(self) -> float:
        return parse_duration(self.config.get("shutdown_grace", DEFAULT_SHUTDOWN_GRACE))

    @property
    def cache_dir(self) -> str:
        cache = self.config.get("cache") or {}
        return self.env.get(CACHE_DIR_ENV) or cache.get("dir", DEFAULT_CACHE_DIR)

    @property
    def cache_max_size(self) -> int:
        return parse_bytesize((self.config.get("cache") or {}).get("max_size", DEFAULT_CACHE_MAX_SIZE))

    @property
    def shared_cache(self) -> dict | None:
        """[cache.s3] when cache.backend = "s3" (the shared tier), else None."""
        cache = self.config.get("cache") or {}
        return (cache.get("s3") or {}) if cache.get("backend", "disk") == "s3" else None

    @property
    def prestop_sleep_s(self) -> int:
        pre = (self.container.get("lifecycle") or {}).get("preStop") or {}
        return int((pre.get("sleep") or {}).get("seconds", 0))

    @property
    def termination_grace_s(self) -> int:
        return int(self.spec.get("terminationGracePeriodSeconds", 30))

    def probes(self) -> dict[str, dict]:
        return {
            kind: self.container[kind]
            for kind in ("startupProbe", "readinessProbe", "livenessProbe")
            if kind in self.container
        }

    def container_ports(self) -> dict[str, int]:
        return {p.get("name", str(p["containerPort"])): p["containerPort"] for p in self.container.get("ports") or []}

    def files(self) -> list[ConfigFile]:
        """Every file the config names."""
        out: list[ConfigFile] = []
        tls = self.config.get("tls")
        if tls:
            out.append(ConfigFile("tls.cert_file", tls["cert_file"], "tls-cert"))
            out.append(ConfigFile("tls.key_file", tls["key_file"], "tls-key"))
            if tls.get("client_ca_file"):
                out.append(ConfigFile("tls.client_ca_file", tls["client_ca_file"], "tls-client-ca"))
        for i, c in enumerate(self.config.get("callers") or []):
            if c.get("token_file"):
                out.append(ConfigFile(f"callers[{i}].token_file", c["token_file"], "caller-token"))
        for i, u in enumerate(self.config.get("upstreams") or []):
            auth = u.get("auth") or {}
            for key, kind in (("file", "docker-config"), ("password_file", "password"), ("token_file", "token")):
                if auth.get(key):
                    out.append(ConfigFile(f"upstreams[{i}].auth.{key}", auth[key], kind))
            if u.get("ca_file"):
                out.append(ConfigFile(f"upstreams[{i}].ca_file", u["ca_file"], "ca"))
        return out

    def effective_security(self) -> dict:
        """The container's security settings, the container's own over the pod's."""
        pod = self.spec.get("securityContext") or {}
        own = self.container.get("securityContext") or {}
        merged = {k: own.get(k, pod.get(k)) for k in ("runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile")}
        merged.update(
            fsGroup=pod.get("fsGroup"),
            supplementalGroups=pod.get("supplementalGroups") or [],
            readOnlyRootFilesystem=own.get("readOnlyRootFilesystem"),
            allowPrivilegeEscalation=own.get("allowPrivilegeEscalation"),
            privileged=own.get("privileged"),
            capabilities=own.get("capabilities") or {},
        )
        return merged


def port_allowed(rules: list[dict], port: int | None, protocol: str, names: dict[str, int],
                 from_nodes: bool = False) -> bool:
    """Whether NetworkPolicy rules allow `port`/`protocol` (a rule without ports allows all).
    With `from_nodes`, only rules whose sources can be a node count: no
    `from` (every source), or an ipBlock among them; a node's processes run
    in the host network, which pod and namespace selectors never select."""
    for rule in rules:
        if from_nodes and rule.get("from") and not any("ipBlock" in peer for peer in rule["from"]):
            continue
        ports = rule.get("ports")
        if not ports:
            return True
        for p in ports:
            if p.get("protocol", "TCP") != protocol:
                continue
            if "port" not in p:
                return True
            value = names.get(p["port"]) if isinstance(p["port"], str) else p["port"]
            if value is None:
                continue
            if value == port or (p.get("endPort") and value <= port <= p["endPort"]):
                return True
    return False


def url_port(url: str) -> int:
    m = re.match(r"(https?)://(\[[^\]]+\]|[^/:]+)(?::(\d+))?", url)
    if not m:
        raise ValueError(f"not a URL: {url}")
    return int(m.group(3)) if m.group(3) else (443 if m.group(1) == "https" else 80)


def config_keys(table: dict, prefix: str = "") -> list[str]:
    """Every key of a TOML document, dotted ("cache.s3.bucket"; "upstreams.auth.file" for arrays)."""
    out: list[str] = []
    for key, value in table.items():
        path = f"{prefix}{key}"
        out.append(path)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                out.extend(config_keys(item, path + "."))
    return out


def check_rendered(name: str, path: Path, dockerfile: Path, cargo_version: str) -> list[str]:
    f = Failures(name)
    objects = load_objects(path)
    pod = Pod(objects, dockerfile)
    c = pod.container
    print(f"{name}: {len(objects)} objects; the container runs {' '.join(pod.argv)}")

    # The image: set by kustomization.yaml's `images`, at the crate's version.
    image = c["image"]
    f.check(":" in image.rsplit("/", 1)[-1], f"image {image} has its tag from kustomization images")
    f.check(image.endswith(f":{cargo_version}") or "@sha256:" in image,
            f"image tag is the crate version {cargo_version}", image)

    # The config comes from a generated ConfigMap, so a config change rolls the pods.
    cm_name = pod.config_map["metadata"]["name"]
    f.check(re.search(r"-[a-z0-9]{10}$", cm_name) is not None,
            f"config {pod.config_path} from ConfigMap {cm_name}, named by a content hash (configMapGenerator)")
    f.check(not pod.env_unsupported,
            "env holds plain values and Secret keys only (the contract run passes the values as they are, "
            "test values for the Secrets')", ", ".join(pod.env_unsupported))
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    external: set[str] = set()
    for var, ref in pod.env_secrets.items():
        f.check(not ref.get("optional"), f"env {var} from Secret {ref['name']} is not optional")
        if ref["name"] in secrets:
            data = secret_data(secrets[ref["name"]])
            f.check(ref["key"] in data, f"Secret {ref['name']} has key {ref['key']} for env {var}", str(sorted(data)))
        else:
            external.add(ref["name"])
    plain = [v for v in AWS_CREDENTIAL_ENV if v in pod.env]
    f.check(not plain, f"no AWS credential variable ({', '.join(AWS_CREDENTIAL_ENV)}) has a plain value",
            ", ".join(plain))
    f.check(pod.config.get("log_format") == "json", "log_format = \"json\"", str(pod.config.get("log_format")))

    # Listen addresses reachable from outside the pod, on the declared ports.
    ports = pod.container_ports()
    listen_host, listen_port = split_address(pod.listen)
    f.check(listen_host in ("0.0.0.0", "::"), f"listen {pod.listen} accepts connections from outside the pod")
    f.check(ports.get("grpc") == listen_port, f"container port grpc = listen port {listen_port}", str(ports))
    metrics = pod.metrics_listen
    if f.check(metrics is not None, "metrics_listen is on"):
        m_host, m_port = split_address(metrics)
        f.check(metrics == "0.0.0.0:9090", f"metrics_listen = \"0.0.0.0:9090\"", metrics)
        f.check(ports.get("metrics") == m_port, f"container port metrics = metrics_listen port {m_port}", str(ports))
    health_port = None
    if pod.health_listen:
        h_host, health_port = split_address(pod.health_listen)
        f.check(h_host in ("0.0.0.0", "::"), f"health_listen {pod.health_listen} accepts the kubelet's probes")
        f.check(health_port in ports.values(), f"health_listen port {health_port} is a container port", str(ports))
    # The OCI HTTP mirror: a container port `mirror` exactly when it is on.
    mirror = pod.mirror_listen
    mirror_port = None
    if mirror:
        mirror_host, mirror_port = split_address(mirror)
        f.check(mirror_host in ("0.0.0.0", "::"), f"mirror_listen {mirror} accepts nodes' connections")
        f.check(ports.get("mirror") == mirror_port, f"container port mirror = mirror_listen port {mirror_port}",
                str(ports))
        others = {split_address(a)[1] for a in (pod.listen, metrics, pod.health_listen) if a}
        f.check(mirror_port not in others, f"mirror_listen port {mirror_port} is no other listener's",
                str(sorted(others)))
    else:
        f.check("mirror" not in ports, "mirror_listen is off and no container port is named mirror", str(ports))

    # Native gRPC probes on a numeric port the service serves plaintext health on.
    probes = pod.probes()
    f.check("readinessProbe" in probes and "livenessProbe" in probes, "readiness and liveness probes present")
    plaintext_health = [health_port] if pod.config.get("tls") else [listen_port, health_port]
    for kind, probe in probes.items():
        grpc = probe.get("grpc")
        if not f.check(grpc is not None, f"{kind} is a native gRPC probe", str(probe)):
            continue
        port = grpc.get("port")
        f.check(isinstance(port, int), f"{kind} port is numeric", repr(port))
        f.check(port in ports.values(), f"{kind} port {port} is a container port", str(ports))
        f.check(port in plaintext_health and port is not None,
                f"{kind} port {port} serves plaintext grpc.health.v1 "
                f"({'health_listen: [tls] is on' if pod.config.get('tls') else 'listen or health_listen'})")

    # Security context (DESIGN section 7).
    sec = pod.effective_security()
    f.check(sec["runAsNonRoot"] is True, "runAsNonRoot")
    f.check(sec["runAsUser"] == RUN_AS and sec["runAsGroup"] == RUN_AS and sec["fsGroup"] == RUN_AS,
            f"runAsUser, runAsGroup and fsGroup {RUN_AS}",
            f"{sec['runAsUser']}/{sec['runAsGroup']}/{sec['fsGroup']}")
    f.check(sec["readOnlyRootFilesystem"] is True, "readOnlyRootFilesystem")
    f.check(sec["allowPrivilegeEscalation"] is False, "allowPrivilegeEscalation: false")
    f.check(not sec["privileged"], "not privileged")
    caps = sec["capabilities"]
    f.check("ALL" in (caps.get("drop") or []) and not caps.get("add"), "capabilities: drop ALL, add none", str(caps))
    f.check((sec["seccompProfile"] or {}).get("type") == "RuntimeDefault", "seccompProfile RuntimeDefault")
    f.check(pod.spec.get("enableServiceLinks") is False,
            "enableServiceLinks: false (no Service variables in the service's OCI_UPSTREAM_ prefix)")

    # Requests and limits.
    res = c.get("resources") or {}
    f.check(all(k in (res.get("requests") or {}) for k in ("cpu", "memory"))
            and all(k in (res.get("limits") or {}) for k in ("cpu", "memory")),
            "cpu and memory requests and limits", str(res))

    # The cache on an emptyDir at cache.dir, bounded above cache.max_size.
    held = mount_holding(pod.cache_dir, pod.mounts)
    cache_mount = held[0] if held and held[1] == "." else None
    if f.check(cache_mount is not None, f"a volume is mounted at cache.dir {pod.cache_dir}"):
        f.check(cache_mount.kind == "emptyDir" and not cache_mount.read_only,
                f"cache volume {cache_mount.name} is a writable emptyDir", cache_mount.kind)
        limit = (cache_mount.volume.get("emptyDir") or {}).get("sizeLimit")
        f.check(limit is not None and parse_quantity(limit) > pod.cache_max_size,
                f"emptyDir sizeLimit {limit} > cache.max_size "
                f"{(pod.config.get('cache') or {}).get('max_size', DEFAULT_CACHE_MAX_SIZE)}")

    # Shutdown: the kubelet's grace period covers preStop, the drain and the exit.
    need = pod.prestop_sleep_s + pod.shutdown_grace_s + EXIT_AFTER_GRACE_S
    f.check(pod.termination_grace_s > need,
            f"terminationGracePeriodSeconds {pod.termination_grace_s} > preStop {pod.prestop_sleep_s} s + "
            f"shutdown_grace {pod.shutdown_grace_s:g} s + {EXIT_AFTER_GRACE_S} s")

    # Files the config names: on Secret (or ConfigMap) volumes, whole, present.
    for mount in pod.mounts:
        if mount.kind in ("secret", "configMap", "projected"):
            f.check(mount.sub_path is None, f"{mount.kind} volume {mount.name} at {mount.path} mounted whole (no subPath)")
    for cf in pod.files():
        held = mount_holding(cf.path, pod.mounts)
        if not f.check(held is not None and held[0].kind in ("secret", "projected"),
                       f"{cf.field} {cf.path} is on a Secret volume",
                       held[0].kind if held else "on the image's filesystem"):
            continue
        mount, relative = held
        f.check(not (mount.volume.get("secret") or {}).get("optional"),
                f"Secret volume {mount.name} is not optional (the service needs {cf.path})")
        secret_name = (mount.volume.get("secret") or {}).get("secretName")
        key = mount.key_for(relative)
        if secret_name in secrets:
            data = secret_data(secrets[secret_name])
            if f.check(key in data, f"Secret {secret_name} has key {key} for {cf.field}", str(sorted(data))):
                if cf.kind == "docker-config":
                    try:
                        auths = json.loads(data[key]).get("auths")
                        f.check(isinstance(auths, dict), f"Secret {secret_name} {key} is a Docker config with `auths`")
                    except (json.JSONDecodeError, AttributeError) as e:
                        f.check(False, f"Secret {secret_name} {key} is JSON", str(e))
            if cf.kind == "docker-config":
                f.check(secrets[secret_name].get("type") == "kubernetes.io/dockerconfigjson"
                        and key == ".dockerconfigjson",
                        f"Secret {secret_name} is a kubernetes.io/dockerconfigjson Secret")
        else:
            external.add(secret_name)

    # No secret material in a ConfigMap: no Secret's value, no credential key
    # in the config, no AWS access key id.
    maps = [o for o in objects if o["kind"] == "ConfigMap"]
    map_text = "\n".join(str(v) for m in maps for v in (m.get("data") or {}).values())
    leaked = sorted({f"{name}/{key}" for name, secret in secrets.items()
                     for key, value in secret_data(secret).items()
                     if len(value.strip()) >= 8 and value.strip().decode(errors="replace") in map_text})
    f.check(not leaked, "no Secret's value appears in a ConfigMap", ", ".join(leaked))
    credential_keys = [k for k in config_keys(pod.config) if not k.endswith("_file") and re.search(
        r"(secret|password|passwd|access_key|session_token|credential)", k.rsplit(".", 1)[-1])]
    f.check(not credential_keys, "the config holds no credential keys (only *_file paths to Secret files)",
            ", ".join(credential_keys))
    f.check(re.search(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b", map_text) is None, "no AWS access key id in a ConfigMap")

    # The shared cache on S3 (cache.backend = "s3"): the bucket, the
    # endpoint, and credentials from a Secret or the pod's identity.
    sas = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ServiceAccount"}
    sa_name = pod.spec.get("serviceAccountName")
    s3 = pod.shared_cache
    if s3 is not None:
        bucket = s3.get("bucket")
        f.check(isinstance(bucket, str) and bucket.strip() != "",
                f"cache.backend = \"s3\" with a [cache.s3] bucket ({bucket!r})")
        f.check(set(s3) <= S3_KEYS, "[cache.s3] holds only the keys the service knows (no credentials)",
                ", ".join(sorted(set(s3) - S3_KEYS)))
        endpoint = s3.get("endpoint") or ""
        if endpoint:
            f.check(re.match(r"https?://[^/@]+(/|$)", endpoint) is not None,
                    f"cache.s3.endpoint {endpoint} is an http(s) URL without credentials in it")
            if endpoint.startswith("http://"):
                f.check(s3.get("allow_http") is True, f"the http endpoint {endpoint} comes with allow_http = true")
        irsa = IRSA_ANNOTATION in ((sas.get(sa_name) or {}).get("metadata", {}).get("annotations") or {})
        static = [v for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if v in pod.env_secrets]
        if irsa:
            # object_store prefers static keys to web identity: any left over
            # would win over the role.
            f.check(not static and "AWS_ACCESS_KEY_ID" not in pod.env,
                    f"ServiceAccount {sa_name} has {IRSA_ANNOTATION} and no static key overrides it",
                    ", ".join(static))
        else:
            refs = [pod.env_secrets.get(v) for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
            f.check(all(refs) and refs[0]["name"] == refs[1]["name"],
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY come from one Secret (secretKeyRef)",
                    ", ".join(sorted(pod.env_secrets)) or "neither is set from a Secret")
            token = pod.env_secrets.get("AWS_SESSION_TOKEN")
            if token:
                f.check(all(refs) and token["name"] == refs[0]["name"], "AWS_SESSION_TOKEN comes from the same Secret")
        key_secret = (pod.env_secrets.get("AWS_ACCESS_KEY_ID") or {}).get("name")
        print(f"  note  shared cache: bucket {bucket!r}, prefix {s3.get('prefix', 'oci-upstream/')!r}, "
              f"{'endpoint ' + endpoint if endpoint else 'AWS S3 in ' + s3.get('region', 'us-east-1')}, "
              f"credentials {'by IRSA' if irsa else f'from Secret {key_secret}'}")
    if external:
        print(f"  note  Secrets the cluster must provide (not rendered): {', '.join(sorted(external))}")

    # The ServiceAccount, with no API token.
    f.check(sa_name in sas, f"ServiceAccount {sa_name} is rendered")
    f.check(pod.spec.get("automountServiceAccountToken") is False, "no service account token mounted")

    # Services: grpc with appProtocol grpc, and metrics, on the container's ports.
    services = [o for o in objects if o["kind"] == "Service" and labels_match({"matchLabels": o["spec"].get("selector")}, pod.labels)]
    if f.check(bool(services), "a Service selects the pods"):
        for svc in services:
            sports = {p.get("name"): p for p in svc["spec"]["ports"]}
            grpc = sports.get("grpc")
            if f.check(grpc is not None, f"Service {svc['metadata']['name']} has a port grpc"):
                f.check(grpc.get("appProtocol") == "grpc", "Service port grpc has appProtocol: grpc")
                target = grpc.get("targetPort", grpc["port"])
                f.check((ports.get(target) if isinstance(target, str) else target) == listen_port,
                        f"Service port grpc targets the listen port {listen_port}", str(target))
            met = sports.get("metrics")
            if metrics and f.check(met is not None, f"Service {svc['metadata']['name']} has a port metrics"):
                target = met.get("targetPort", met["port"])
                f.check((ports.get(target) if isinstance(target, str) else target) == split_address(metrics)[1],
                        "Service port metrics targets metrics_listen's port", str(target))
            mir = sports.get("mirror")
            if mirror_port is None:
                f.check(mir is None, f"mirror_listen is off and Service {svc['metadata']['name']} has no port mirror",
                        str(mir))
            elif f.check(mir is not None, f"Service {svc['metadata']['name']} has a port mirror"):
                target = mir.get("targetPort", mir["port"])
                f.check((ports.get(target) if isinstance(target, str) else target) == mirror_port,
                        f"Service port mirror ({mir['port']}) targets mirror_listen's port {mirror_port}", str(target))
                f.check(mir.get("appProtocol") == "http" and mir.get("protocol", "TCP") == "TCP",
                        "Service port mirror is TCP with appProtocol: http (plain HTTP)", str(mir))

    # Replicas: the HPA's, at least two; the PDB lets one of them be drained.
    hpas = [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"
            and o["spec"]["scaleTargetRef"].get("kind") == "Deployment"
            and o["spec"]["scaleTargetRef"].get("name") == pod.deployment["metadata"]["name"]]
    min_replicas = 1
    if f.check(len(hpas) == 1 and hpas[0]["apiVersion"] == "autoscaling/v2",
               "an autoscaling/v2 HorizontalPodAutoscaler scales the Deployment"):
        min_replicas = hpas[0]["spec"].get("minReplicas", 1)
        f.check(min_replicas >= 2, f"HPA minReplicas {min_replicas} >= 2")
        f.check("replicas" not in pod.deployment["spec"], "the Deployment leaves replicas to the HPA")
    pdbs = [o for o in objects if o["kind"] == "PodDisruptionBudget" and labels_match(o["spec"].get("selector"), pod.labels)]
    if f.check(len(pdbs) == 1, "a PodDisruptionBudget selects the pods"):
        allowed = pdb_allowed_disruptions(pdbs[0]["spec"], min_replicas)
        f.check(1 <= allowed < min_replicas,
                f"at {min_replicas} replicas the PDB allows {allowed} disruption(s): one pod can be drained, one serves")

    # Spread over nodes and zones.
    tsc = pod.spec.get("topologySpreadConstraints") or []
    keys = {t["topologyKey"] for t in tsc if labels_match(t.get("labelSelector"), pod.labels)}
    f.check({"kubernetes.io/hostname", "topology.kubernetes.io/zone"} <= keys,
            "topologySpreadConstraints over hostname and zone select the pods", str(sorted(keys)))

    # NetworkPolicy: in to gRPC and metrics; out (when restricted) to DNS, 443 and every upstream.
    nps = [o for o in objects if o["kind"] == "NetworkPolicy" and labels_match(o["spec"].get("podSelector"), pod.labels)]
    if f.check(bool(nps), "a NetworkPolicy selects the pods"):
        for np in nps:
            types = np["spec"].get("policyTypes") or ["Ingress"]
            if "Ingress" in types:
                ingress = np["spec"].get("ingress") or []
                f.check(port_allowed(ingress, listen_port, "TCP", ports), f"ingress allows gRPC ({listen_port})")
                if metrics:
                    f.check(port_allowed(ingress, split_address(metrics)[1], "TCP", ports), "ingress allows metrics")
                if mirror_port is not None:
                    f.check(port_allowed(ingress, mirror_port, "TCP", ports), f"ingress allows the mirror ({mirror_port})")
                    f.check(port_allowed(ingress, mirror_port, "TCP", ports, from_nodes=True),
                            "ingress admits the mirror port from nodes: a rule without `from` or with an ipBlock "
                            "(pod and namespace selectors never match a node's containerd)")
            if "Egress" in types:
                egress = np["spec"].get("egress") or []
                f.check(port_allowed(egress, 53, "UDP", ports) and port_allowed(egress, 53, "TCP", ports),
                        "egress allows DNS (53 UDP and TCP)")
                f.check(port_allowed(egress, 443, "TCP", ports), "egress allows 443 (registries, token realms, CDNs)")
                for u in pod.config.get("upstreams") or []:
                    if u.get("enabled", True):
                        for key in ("url", "proxy"):
                            if u.get(key):
                                port = url_port(u[key])
                                f.check(port_allowed(egress, port, "TCP", ports),
                                        f"egress allows upstream {u['name']}'s {key} port {port}")
                if pod.shared_cache is not None:
                    endpoint = pod.shared_cache.get("endpoint") or ""
                    port = url_port(endpoint) if endpoint else 443
                    f.check(port_allowed(egress, port, "TCP", ports),
                            f"egress allows the S3 endpoint's port {port} ({endpoint or 'AWS S3'})")
                if pod.config.get("otlp_endpoint"):
                    port = url_port(pod.config["otlp_endpoint"])
                    f.check(port_allowed(egress, port, "TCP", ports), f"egress allows otlp_endpoint's port {port}")

    # Labels on every object.
    unlabelled = [f"{o['kind']}/{o['metadata']['name']}" for o in objects
                  if not all(k in (o["metadata"].get("labels") or {}) for k in SELECTOR_LABELS)]
    f.check(not unlabelled, f"every object has {' and '.join(SELECTOR_LABELS)}", ", ".join(unlabelled))

    # Optional components.
    for sm in (o for o in objects if o["kind"] == "ServiceMonitor"):
        selected = [s for s in objects if s["kind"] == "Service" and labels_match(sm["spec"].get("selector"), s["metadata"].get("labels") or {})]
        names = {p.get("name") for s in selected for p in s["spec"]["ports"]}
        f.check(bool(selected) and all(e.get("port") in names for e in sm["spec"]["endpoints"]),
                f"ServiceMonitor {sm['metadata']['name']} selects the Service and names its metrics port")
    for cert in (o for o in objects if o["kind"] == "Certificate"):
        tls = pod.config.get("tls") or {}
        held = mount_holding(tls.get("cert_file", "/nonexistent"), pod.mounts)
        secret_name = ((held[0].volume.get("secret") or {}).get("secretName")) if held else None
        f.check(cert["spec"].get("secretName") == secret_name,
                f"Certificate {cert['metadata']['name']} writes the Secret the TLS files come from ({secret_name})")
        key_held = mount_holding(tls.get("key_file", "/nonexistent"), pod.mounts)
        f.check(held is not None and held[0].key_for(held[1]) == "tls.crt"
                and key_held is not None and key_held[0].key_for(key_held[1]) == "tls.key",
                "tls.cert_file and tls.key_file are the tls.crt and tls.key cert-manager writes")
    print(f"  {f.passed} assertions passed, {len(f.failed)} failed")
    return f.failed


def pdb_allowed_disruptions(spec: dict, replicas: int) -> int:
    """How many of `replicas` healthy pods a PDB lets be evicted."""
    def amount(value, round_up: bool) -> int:
        if isinstance(value, str) and value.endswith("%"):
            exact = replicas * int(value[:-1]) / 100
            return math.ceil(exact) if round_up else math.floor(exact)
        return int(value)

    if "maxUnavailable" in spec:
        return min(replicas, amount(spec["maxUnavailable"], round_up=True))
    if "minAvailable" in spec:
        return max(0, replicas - amount(spec["minAvailable"], round_up=True))
    return replicas


def check_dockerfile(dockerfile: Path, cargo_toml: Path) -> list[str]:
    f = Failures("Dockerfile")
    version = tomllib.loads(cargo_toml.read_text())["package"]["version"]
    stages = dockerfile_stages(dockerfile)
    print(f"Dockerfile: {len(stages)} stages: {', '.join(s.image for s in stages)}")
    f.check(len(stages) >= 2, "multi-stage")
    build, runtime = stages[0], stages[-1]
    runs = " ".join(build.all("RUN"))
    f.check("cargo build --release --locked" in runs, "the build stage runs cargo build --release --locked")
    f.check("type=cache" in runs, "the build stage keeps dependencies in cache mounts")
    f.check(runtime.image in ("gcr.io/distroless/cc-debian12:nonroot",) or re.match(r"(docker\.io/library/)?debian:[\w.-]*slim", runtime.image) is not None,
            f"runtime base {runtime.image} is distroless cc (nonroot) or debian-slim")
    f.check(runtime.last("USER") == f"{RUN_AS}:{RUN_AS}", f"USER {RUN_AS}:{RUN_AS}", str(runtime.last("USER")))
    f.check(exec_form(runtime.last("ENTRYPOINT")) == ["/oci-upstream"], 'ENTRYPOINT ["/oci-upstream"]')
    f.check(exec_form(runtime.last("CMD")) == ["serve", "--config", "/etc/oci-upstream/config.toml"],
            'CMD ["serve", "--config", "/etc/oci-upstream/config.toml"]')
    f.check(any(c.split()[-1] == "/oci-upstream" for c in runtime.all("COPY")), "the binary is copied to /oci-upstream")
    exposed = {p for e in runtime.all("EXPOSE") for p in e.split()}
    f.check({"50051", "9090"} <= exposed, "EXPOSE 50051 9090", str(sorted(exposed)))
    labels = " ".join(runtime.all("LABEL"))
    for key in ("title", "description", "licenses", "version", "revision"):
        f.check(f"org.opencontainers.image.{key}=" in labels, f"label org.opencontainers.image.{key}")
    args = dict(a.split("=", 1) for a in runtime.all("ARG") if "=" in a)
    f.check(args.get("VERSION") == version, f"ARG VERSION defaults to the crate version {version}", str(args.get("VERSION")))
    print(f"  {f.passed} assertions passed, {len(f.failed)} failed")
    return f.failed


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "dockerfile":
        failed = check_dockerfile(Path(argv[1]), Path(argv[2]))
    elif len(argv) == 5 and argv[0] == "rendered":
        cargo_version = tomllib.loads(Path(argv[4]).read_text())["package"]["version"]
        failed = check_rendered(argv[1], Path(argv[2]), Path(argv[3]), cargo_version)
    else:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    if failed:
        print(f"{len(failed)} assertion(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
