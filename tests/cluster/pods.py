"""What a kubelet and a container runtime make of a rendered DaemonSet's pod template on one
node: per container, the command line, environment, mounts, user, capabilities and probes.
Pure logic (no I/O): tests/cluster/__main__.py turns a ContainerPlan into a running process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
# containerd's default capability set: what a container has before drop/add.
RUNTIME_DEFAULT_CAPS = (
    "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
    "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
)  # fmt: skip
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
# securityContext fields this test applies (seccompProfile is read but not applied: the
# README says so); any other field fails the plan, so a change in deploy/ is never ignored.
_SECURITY_FIELDS = frozenset(
    {
        "runAsUser", "runAsGroup", "runAsNonRoot", "allowPrivilegeEscalation", "capabilities",
        "readOnlyRootFilesystem", "seccompProfile",
    }
)  # fmt: skip
_UNSUPPORTED_CONTAINER_FIELDS = ("lifecycle", "startupProbe", "tty", "stdin")


class PlanError(ValueError):
    """The pod template asks for something this test cannot provide (or a kubelet refuses)."""


@dataclass
class Probe:
    kind: str  # readiness | liveness
    path: str
    port: int
    period: float
    timeout: float
    initial_delay: float
    failure_threshold: int


@dataclass
class ContainerPlan:
    name: str
    init: bool
    argv: list[str]
    env: dict[str, str]
    uid: int
    gid: int
    caps: list[str]
    no_new_privs: bool
    readonly_root: bool
    # (volume name or special, mountPath, readOnly)
    mounts: list[tuple[str, str, bool]] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    cwd: str = "/"


@dataclass
class NodeFacts:
    """What a kubelet knows when it starts the pod."""

    node_name: str
    node_ip: str
    pod_name: str
    namespace: str
    kubernetes_service: tuple[str, int]  # the default/kubernetes Service's ClusterIP and port
    image_env: dict[str, str]
    image_user: tuple[int, int]


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: known variables are replaced, unknown ones kept, $$ escapes."""
    out = _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), value.replace("$$", "\0"))
    return out.replace("\0", "$")


def _field_ref(path: str, facts: NodeFacts) -> str:
    values = {
        "spec.nodeName": facts.node_name,
        "metadata.name": facts.pod_name,
        "metadata.namespace": facts.namespace,
        "status.hostIP": facts.node_ip,
        "status.podIP": facts.node_ip,  # hostNetwork pods only here
    }
    if path not in values:
        raise PlanError(f"fieldRef {path} is not supported by the cluster test")
    return values[path]


def environment(
    container: dict[str, Any], configmaps: dict[str, dict[str, str]], facts: NodeFacts
) -> dict[str, str]:
    """The image's env, then what a kubelet always adds, then envFrom, then env (in order)."""
    host, port = facts.kubernetes_service
    env = dict(facts.image_env)
    env["HOSTNAME"] = facts.node_name  # hostNetwork: the node's host name
    # Set even with enableServiceLinks: false (the master service's variables).
    env.update(
        {
            "KUBERNETES_SERVICE_HOST": host,
            "KUBERNETES_SERVICE_PORT": str(port),
            "KUBERNETES_PORT": f"tcp://{host}:{port}",
            f"KUBERNETES_PORT_{port}_TCP": f"tcp://{host}:{port}",
        }
    )
    for source in container.get("envFrom") or []:
        ref = source.get("configMapRef")
        if ref is None:
            raise PlanError(f"envFrom {source} is not supported by the cluster test")
        data = configmaps.get(ref["name"])
        if data is None:
            if ref.get("optional"):
                continue
            raise PlanError(f"envFrom: ConfigMap {ref['name']} not found")
        prefix = source.get("prefix", "")
        env.update({prefix + k: v for k, v in data.items()})
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
        elif "fieldRef" in (item.get("valueFrom") or {}):
            env[item["name"]] = _field_ref(item["valueFrom"]["fieldRef"]["fieldPath"], facts)
        elif "configMapKeyRef" in (item.get("valueFrom") or {}):
            ref = item["valueFrom"]["configMapKeyRef"]
            env[item["name"]] = configmaps[ref["name"]][ref["key"]]
        else:
            raise PlanError(f"env {item['name']}: unsupported source")
    return env


def capabilities(security: dict[str, Any]) -> list[str]:
    caps = security.get("capabilities") or {}
    drop = {c.upper() for c in caps.get("drop") or []}
    add = [c.upper().removeprefix("CAP_") for c in caps.get("add") or []]
    base = [] if "ALL" in drop else [c for c in RUNTIME_DEFAULT_CAPS if c not in drop]
    return sorted(set(base) | set(add))


def _probe(kind: str, spec: dict[str, Any], ports: dict[str, int]) -> Probe:
    http = spec.get("httpGet")
    if http is None:
        raise PlanError(f"{kind}Probe without httpGet is not supported by the cluster test")
    port = http["port"]
    return Probe(
        kind=kind,
        path=http.get("path", "/"),
        port=ports[port] if isinstance(port, str) else int(port),
        period=float(spec.get("periodSeconds", 10)),
        timeout=float(spec.get("timeoutSeconds", 1)),
        initial_delay=float(spec.get("initialDelaySeconds", 0)),
        failure_threshold=int(spec.get("failureThreshold", 3)),
    )


def plan_pod(
    daemonset: dict[str, Any], configmaps: dict[str, dict[str, str]], facts: NodeFacts
) -> list[ContainerPlan]:
    """Init containers first (in order), then the containers, as a kubelet runs them."""
    spec = daemonset["spec"]["template"]["spec"]
    if not spec.get("hostNetwork"):
        raise PlanError("the cluster test runs hostNetwork DaemonSets only")
    pod_security = spec.get("securityContext") or {}
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    plans = []
    for init, key in ((True, "initContainers"), (False, "containers")):
        for container in spec.get(key) or []:
            security = {**pod_security, **(container.get("securityContext") or {})}
            unknown = set(security) - _SECURITY_FIELDS
            unknown |= {f for f in _UNSUPPORTED_CONTAINER_FIELDS if container.get(f)}
            if unknown:
                raise PlanError(
                    f"{container['name']}: {sorted(unknown)} not supported by the cluster test"
                )
            uid = int(security.get("runAsUser", facts.image_user[0]))
            gid = int(security.get("runAsGroup", facts.image_user[1]))
            if security.get("runAsNonRoot") and uid == 0:
                raise PlanError(f"{container['name']}: runAsNonRoot and the user is root")
            env = environment(container, configmaps, facts)
            argv = [
                expand(a, env)
                for a in (container.get("command") or []) + (container.get("args") or [])
            ]
            if not container.get("command"):
                raise PlanError(
                    f"{container['name']}: no command (the image's entrypoint is not read)"
                )
            mounts = []
            for mount in container.get("volumeMounts") or []:
                volume = volumes.get(mount["name"])
                if volume is None:
                    raise PlanError(f"{container['name']}: volume {mount['name']} is not defined")
                mounts.append((mount["name"], mount["mountPath"], bool(mount.get("readOnly"))))
            if spec.get("automountServiceAccountToken", True):
                mounts.append(("<serviceaccount>", SA_MOUNT, True))
            ports = {
                p["name"]: p["containerPort"] for p in container.get("ports") or [] if "name" in p
            }
            probes = [
                _probe(kind, container[f"{kind}Probe"], ports)
                for kind in ("readiness", "liveness")
                if container.get(f"{kind}Probe")
            ]
            plans.append(
                ContainerPlan(
                    name=container["name"],
                    init=init,
                    argv=argv,
                    env=env,
                    uid=uid,
                    gid=gid,
                    caps=capabilities(security),
                    no_new_privs=not security.get("allowPrivilegeEscalation", True),
                    readonly_root=bool(security.get("readOnlyRootFilesystem")),
                    mounts=mounts,
                    probes=probes,
                    cwd=container.get("workingDir") or "/",
                )
            )
    return plans


def _count(value: int | str, nodes: int) -> int:
    """An IntOrString of a rolling update as a node count (percentages round up, as the
    DaemonSet controller does)."""
    if isinstance(value, str) and value.endswith("%"):
        return -(-int(value[:-1]) * nodes // 100)
    return int(value)


def rollout(daemonset: dict[str, Any], nodes: int) -> tuple[int, bool]:
    """How a RollingUpdate replaces the pods: (nodes at a time, surge). With maxSurge the
    DaemonSet controller starts the new pod on a node before it stops the old one (and then
    maxUnavailable must be 0); otherwise it stops up to maxUnavailable old pods first. At
    least one node at a time."""
    strategy = daemonset["spec"].get("updateStrategy") or {}
    if strategy.get("type", "RollingUpdate") != "RollingUpdate":
        raise PlanError("updateStrategy OnDelete: no rolling update to test")
    rolling = strategy.get("rollingUpdate") or {}
    surge = _count(rolling.get("maxSurge", 0), nodes)
    unavailable = _count(rolling.get("maxUnavailable", 0 if surge else 1), nodes)
    if surge and unavailable:
        raise PlanError("maxSurge and maxUnavailable both above 0: not emulated")
    if not surge and not unavailable:
        raise PlanError("maxSurge and maxUnavailable both 0: the update cannot progress")
    return max(1, surge or unavailable), bool(surge)


def max_unavailable(daemonset: dict[str, Any], nodes: int) -> int:
    """How many nodes a RollingUpdate without surge may take down at once."""
    batch, surge = rollout(daemonset, nodes)
    if surge:
        raise PlanError("maxSurge: the rollout surges, it takes no node down")
    return batch
