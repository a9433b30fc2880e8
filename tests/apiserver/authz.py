"""Optional RBAC for the fake API server: service-account bearer tokens and the rbac/v1 objects
(ClusterRole, ClusterRoleBinding, Role, RoleBinding) of a rendered manifest decide what each
request may do, as kube-apiserver's RBAC authorizer does; a request no rule grants gets 403.

Without an Rbac the server keeps its single all-powerful token. With one, that token and the
client certificate stay cluster-admin (the test's own access), and every token added with
`set_token` authenticates as its user, whose groups are those kube-apiserver gives a service
account (system:serviceaccounts, system:serviceaccounts:NS, system:authenticated).
"""

from __future__ import annotations

import hmac
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

RBAC_KINDS = frozenset({"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"})
ADMIN = "system:admin"


@dataclass(frozen=True)
class Request:
    """A resource request as an authorizer sees it."""

    verb: str
    group: str
    resource: str
    namespace: str | None
    name: str | None


def service_account_user(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


def _groups(user: str) -> set[str]:
    groups = {"system:authenticated"}
    parts = user.split(":")
    if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
        groups |= {"system:serviceaccounts", f"system:serviceaccounts:{parts[2]}"}
    return groups


def _has(values: Iterable[str], value: str) -> bool:
    values = list(values)
    return "*" in values or value in values


def rule_allows(rule: dict[str, Any], req: Request) -> bool:
    """rbac/v1 PolicyRule matching (resourceNames limit get/update/delete of one object)."""
    if not (
        _has(rule.get("verbs") or [], req.verb)
        and _has(rule.get("apiGroups") or [], req.group)
        and _has(rule.get("resources") or [], req.resource)
    ):
        return False
    names = rule.get("resourceNames") or []
    return not names or (req.name is not None and req.name in names)


class Rbac:
    """Tokens -> users, and the rules bound to them. Thread-safe: tokens change while the
    server runs (rotation)."""

    def __init__(self, objects: Iterable[dict[str, Any]] = ()) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, str] = {}
        self._roles: dict[tuple[str | None, str], list[dict[str, Any]]] = {}
        self._bindings: list[dict[str, Any]] = []
        self.used: Counter[str] = Counter()  # token -> authenticated requests
        self.denied: list[tuple[str, Request]] = []
        self.load(objects)

    def load(self, objects: Iterable[dict[str, Any]]) -> None:
        """Take the rbac/v1 objects among `objects` (others are ignored)."""
        with self._lock:
            for obj in objects:
                kind = obj.get("kind")
                if kind not in RBAC_KINDS:
                    continue
                meta = obj.get("metadata") or {}
                namespace = meta.get("namespace") if kind in ("Role", "RoleBinding") else None
                if kind in ("ClusterRole", "Role"):
                    self._roles[(namespace, meta["name"])] = list(obj.get("rules") or [])
                else:
                    self._bindings.append({**obj, "_namespace": namespace})

    def set_token(self, token: str, user: str) -> None:
        with self._lock:
            self._tokens[token] = user

    def revoke(self, token: str) -> None:
        with self._lock:
            self._tokens.pop(token, None)

    def authenticate(self, token: str) -> str | None:
        with self._lock:
            for known, user in self._tokens.items():
                if hmac.compare_digest(known.encode(), token.encode()):
                    self.used[known] += 1
                    return user
        return None

    def _subject_matches(self, subject: dict[str, Any], user: str, groups: set[str]) -> bool:
        kind = subject.get("kind")
        if kind == "ServiceAccount":
            return user == service_account_user(subject.get("namespace", ""), subject["name"])
        if kind == "User":
            return bool(subject.get("name") == user)
        return kind == "Group" and subject.get("name") in groups

    def allows(self, user: str, req: Request) -> bool:
        if user == ADMIN:
            return True
        groups = _groups(user)
        with self._lock:
            for binding in self._bindings:
                scope = binding["_namespace"]
                if scope is not None and scope != req.namespace:
                    continue  # a RoleBinding grants only inside its namespace
                if not any(
                    self._subject_matches(s, user, groups) for s in binding.get("subjects") or []
                ):
                    continue
                ref = binding.get("roleRef") or {}
                role_ns = scope if ref.get("kind") == "Role" else None
                rules = self._roles.get((role_ns, ref.get("name", "")), [])
                if any(rule_allows(rule, req) for rule in rules):
                    return True
            self.denied.append((user, req))
        return False
