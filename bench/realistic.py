"""Dress minimal generated objects as a real cluster's objects look on the wire (issue 15).

The benchmarks' generators write the fields the daemons read and little else. A real cluster's
objects carry much more, and all of it crosses the wire and the JSON parser:
- every object: `uid`, `creationTimestamp` (the API server adds them) and `managedFields`, the
  server-side-apply bookkeeping (one entry per field manager, a `fieldsV1` tree naming every
  field that manager set);
- Services: a few labels (the `app.kubernetes.io/*` set and Helm's), Helm's release
  annotations and `kubectl.kubernetes.io/last-applied-configuration` (the whole applied object
  as JSON text), the defaulted spec fields;
- EndpointSlices: the controller's labels (the Service's labels copied, `managed-by`), the
  trigger-time annotation, an `ownerReference` to the Service, and on every endpoint the full
  conditions, `nodeName`, `zone` and a Pod `targetRef` with its uid;
- Namespaces: the `kubernetes.io/metadata.name` label, managedFields.

`dress(objects)` does this in place, deterministically, without changing any field the
minimal object had, so the DNS records a benchmark derives from the minimal objects stay the
same. Bench/dns.py and bench/sync.py use it by default (`--objects realistic`).
"""

from __future__ import annotations

import json
import random
import uuid
from typing import Any

TIME = "2026-11-20T08:00:00Z"
NODES = 100
ZONES = ("eu-west-1a", "eu-west-1b", "eu-west-1c")
POD_SUFFIX = "bcdfghjklmnpqrstvwxz2456789"


class Dresser:
    """Deterministic uids and pod names for one generated cluster."""

    def __init__(self, seed: int = 15) -> None:
        self._rng = random.Random(seed)
        self._service_uids: dict[tuple[str, str], str] = {}

    def uid(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def suffix(self, n: int) -> str:
        return "".join(self._rng.choice(POD_SUFFIX) for _ in range(n))

    def dress(self, obj: dict[str, Any]) -> dict[str, Any]:
        kind = obj.get("kind")
        if kind == "Service":
            self._service(obj)
        elif kind == "EndpointSlice":
            self._slice(obj)
        elif kind == "Namespace":
            self._namespace(obj)
        return obj

    # --- per kind ------------------------------------------------------------------------

    def _service(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        name, ns = meta["name"], meta.get("namespace", "default")
        release = f"{name}-prod"
        labels = {
            "app.kubernetes.io/name": name,
            "app.kubernetes.io/instance": release,
            "app.kubernetes.io/component": "server",
            "app.kubernetes.io/managed-by": "Helm",
            "app.kubernetes.io/version": "1.27.3",
            "helm.sh/chart": f"{name}-4.2.1",
        }
        meta["labels"] = {**labels, **(meta.get("labels") or {})}
        spec = obj.setdefault("spec", {})
        spec.setdefault("sessionAffinity", "None")
        spec.setdefault("internalTrafficPolicy", "Cluster")
        if spec.get("clusterIP") != "None":
            spec.setdefault("ipFamilies", ["IPv4"])
            spec.setdefault("ipFamilyPolicy", "SingleStack")
        applied = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "annotations": {"meta.helm.sh/release-name": release},
                "labels": meta["labels"],
                "name": name,
                "namespace": ns,
            },
            "spec": {k: v for k, v in spec.items() if k not in ("clusterIP", "clusterIPs")},
        }
        meta["annotations"] = {
            "meta.helm.sh/release-name": release,
            "meta.helm.sh/release-namespace": ns,
            "kubectl.kubernetes.io/last-applied-configuration": json.dumps(
                applied, separators=(",", ":"), sort_keys=True
            )
            + "\n",
            **(meta.get("annotations") or {}),
        }
        obj.setdefault("status", {"loadBalancer": {}})
        uid = meta.setdefault("uid", self.uid())
        meta.setdefault("creationTimestamp", TIME)
        self._service_uids[(ns, name)] = uid
        meta["managedFields"] = [
            managed_entry("kubectl-client-side-apply", "v1", {"metadata": meta, "spec": spec}),
            managed_entry("kube-apiserver", "v1", {"spec": {"clusterIP": 1, "clusterIPs": 1}}),
        ]

    def _slice(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        ns = meta.get("namespace", "default")
        service = (meta.get("labels") or {}).get("kubernetes.io/service-name", "")
        meta["labels"] = {
            "app.kubernetes.io/name": service,
            "app.kubernetes.io/instance": f"{service}-prod",
            "app.kubernetes.io/managed-by": "Helm",
            "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            **(meta.get("labels") or {}),
        }
        meta["annotations"] = {
            "endpoints.kubernetes.io/last-change-trigger-time": TIME,
            **(meta.get("annotations") or {}),
        }
        meta.setdefault("generateName", f"{service}-")
        meta.setdefault("generation", 3)
        meta.setdefault("uid", self.uid())
        meta.setdefault("creationTimestamp", TIME)
        if service:
            owner_uid = self._service_uids.get((ns, service)) or self.uid()
            meta["ownerReferences"] = [
                {
                    "apiVersion": "v1",
                    "blockOwnerDeletion": True,
                    "controller": True,
                    "kind": "Service",
                    "name": service,
                    "uid": owner_uid,
                }
            ]
        replica_set = f"{service}-{self.suffix(10)}"
        for n, endpoint in enumerate(obj.get("endpoints") or []):
            conditions = endpoint.setdefault("conditions", {})
            ready = conditions.get("ready", True)
            conditions.setdefault("ready", ready)
            conditions.setdefault("serving", ready)
            conditions.setdefault("terminating", False)
            node = (hash_index(service, n) % NODES) if service else n % NODES
            endpoint.setdefault("nodeName", f"ip-10-0-{node // 64}-{node % 64 + 10}.ec2.internal")
            endpoint.setdefault("zone", ZONES[node % len(ZONES)])
            ref = endpoint.setdefault(
                "targetRef", {"kind": "Pod", "name": f"{replica_set}-{self.suffix(5)}"}
            )
            ref.setdefault("namespace", ns)
            ref.setdefault("uid", self.uid())
        meta["managedFields"] = [
            managed_entry(
                "kube-controller-manager", "discovery.k8s.io/v1", obj, skip=("endpoints",)
            )
        ]

    def _namespace(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        meta["labels"] = {"kubernetes.io/metadata.name": meta["name"], **(meta.get("labels") or {})}
        meta.setdefault("uid", self.uid())
        meta.setdefault("creationTimestamp", TIME)
        meta["managedFields"] = [managed_entry("kubectl-create", "v1", {"metadata": meta})]


def dress(objects: list[dict[str, Any]], seed: int = 15) -> list[dict[str, Any]]:
    """Every object dressed in place (see the module docstring); returns the same list."""
    dresser = Dresser(seed)
    # Services first, so their EndpointSlices' ownerReferences carry the right uid.
    for obj in sorted(objects, key=lambda o: o.get("kind") != "Service"):
        dresser.dress(obj)
    return objects


def hash_index(text: str, n: int) -> int:
    """A stable spread (Python's str hash is salted per process)."""
    return sum(text.encode()) * 31 + n * 7


def managed_entry(
    manager: str, api_version: str, fields: dict[str, Any], skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """One managedFields entry whose fieldsV1 names every field of `fields`."""
    return {
        "apiVersion": api_version,
        "fieldsType": "FieldsV1",
        "fieldsV1": fields_v1(
            {k: v for k, v in fields.items() if k not in ("apiVersion", "kind", "status")},
            skip,
        ),
        "manager": manager,
        "operation": "Update",
        "time": TIME,
    }


def fields_v1(value: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The FieldsV1 set of a JSON value: `f:<name>` per map key, `k:{...}` per keyed list item
    (ports by port and protocol), `{}` for leaves and atomic lists, `.` for a map itself."""
    if not isinstance(value, dict):
        return {}
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key in ("managedFields", "uid", "resourceVersion", "creationTimestamp"):
            continue
        if key in skip:
            out[f"f:{key}"] = {}
        elif isinstance(item, dict):
            out[f"f:{key}"] = {".": {}, **fields_v1(item)} if item else {}
        elif isinstance(item, list) and item and all(isinstance(i, dict) for i in item):
            out[f"f:{key}"] = {
                ".": {},
                **{_list_key(i): {".": {}, **fields_v1(i)} for i in item},
            }
        else:
            out[f"f:{key}"] = {}
    return out


def _list_key(item: dict[str, Any]) -> str:
    keyed = {k: item[k] for k in ("uid", "port", "protocol", "name", "type") if k in item}
    return "k:" + json.dumps(keyed, separators=(",", ":"), sort_keys=True)
