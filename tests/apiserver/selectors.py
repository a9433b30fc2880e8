"""Label and field selectors with kube-apiserver's syntax and semantics."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import BadRequest
from .resources import ResourceType

_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"
_DNS1123_SUBDOMAIN = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*"
_KEY_RE = re.compile(rf"(?:(?P<prefix>{_DNS1123_SUBDOMAIN})/)?(?P<name>{_NAME})")
_VALUE_RE = re.compile(rf"(?:{_NAME})?")

_SET_RE = re.compile(r"^(?P<key>[^\s!=<>(),]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")
_CMP_RE = re.compile(r"^(?P<key>[^\s!=<>(),]+)\s*(?P<op>==|=|!=|>|<)\s*(?P<value>[^\s!=<>(),]*)$")
_EXISTS_RE = re.compile(r"^(?P<neg>!?)\s*(?P<key>[^\s!=<>(),]+)$")

_FIELD_OPS = ("!=", "==", "=")  # longest first: "a!=b" must not parse as "a!" "=" "b"


class SelectorError(BadRequest):
    """A selector that does not parse; the API answers 400."""


def _check_key(key: str, selector: str) -> str:
    match = _KEY_RE.fullmatch(key)
    if (
        match is None
        or len(match["name"]) > 63
        or (match["prefix"] is not None and len(match["prefix"]) > 253)
    ):
        raise SelectorError(
            f"unable to parse requirement: invalid label key {key!r} in selector {selector!r}"
        )
    return key


def _check_value(value: str, selector: str) -> str:
    if len(value) > 63 or _VALUE_RE.fullmatch(value) is None:
        raise SelectorError(
            f"unable to parse requirement: invalid label value {value!r} in selector {selector!r}"
        )
    return value


@dataclass(frozen=True, slots=True)
class Requirement:
    """One comma-separated term of a label selector."""

    key: str
    op: str  # "in" | "notin" | "exists" | "!" | "gt" | "lt"
    values: frozenset[str] = frozenset()
    bound: int = 0  # for gt / lt

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.op == "in":
            return present and labels[self.key] in self.values
        if self.op == "notin":
            # As in Kubernetes: a missing label satisfies != and notin.
            return not present or labels[self.key] not in self.values
        if self.op == "exists":
            return present
        if self.op == "!":
            return not present
        if not present:
            return False
        try:
            number = int(labels[self.key])
        except ValueError:
            return False
        return number > self.bound if self.op == "gt" else number < self.bound


@dataclass(frozen=True, slots=True)
class LabelSelector:
    requirements: tuple[Requirement, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.requirements

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(req.matches(labels) for req in self.requirements)


def _split_terms(text: str) -> list[str]:
    """Split on commas that are not inside `in (...)` value lists."""
    terms: list[str] = []
    depth = 0
    start = 0
    for i, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            terms.append(text[start:i])
            start = i + 1
    terms.append(text[start:])
    return [term.strip() for term in terms]


def _parse_requirement(term: str, selector: str) -> Requirement:
    if match := _SET_RE.match(term):
        values = [v.strip() for v in match["values"].split(",")]
        if values == [""]:
            raise SelectorError(
                f"unable to parse requirement: for 'in', 'notin' operators, "
                f"values set can't be empty in selector {selector!r}"
            )
        checked = frozenset(_check_value(v, selector) for v in values)
        return Requirement(_check_key(match["key"], selector), match["op"], checked)
    if match := _CMP_RE.match(term):
        key = _check_key(match["key"], selector)
        op, value = match["op"], match["value"]
        if op in (">", "<"):
            if not re.fullmatch(r"-?\d+", value):
                raise SelectorError(
                    f"unable to parse requirement: for 'Gt', 'Lt' operators, the value must be "
                    f"an integer in selector {selector!r}"
                )
            return Requirement(key, "gt" if op == ">" else "lt", bound=int(value))
        single = frozenset({_check_value(value, selector)})
        return Requirement(key, "notin" if op == "!=" else "in", single)
    if match := _EXISTS_RE.match(term):
        key = _check_key(match["key"], selector)
        return Requirement(key, "!" if match["neg"] else "exists")
    raise SelectorError(f"unable to parse requirement: found {term!r} in selector {selector!r}")


def parse_label_selector(text: str | None) -> LabelSelector:
    """Parse `labelSelector`; an empty string selects everything."""
    if text is None or not text.strip():
        return LabelSelector()
    terms = _split_terms(text)
    if any(not term for term in terms):
        raise SelectorError(f"unable to parse requirement: empty term in selector {text!r}")
    return LabelSelector(tuple(_parse_requirement(term, text) for term in terms))


def field_value(obj: Mapping[str, Any], path: str) -> str:
    """A field as the apiserver's field-label conversion renders it: missing -> ""."""
    node: Any = obj
    for part in path.split("."):
        if not isinstance(node, Mapping):
            return ""
        node = node.get(part)
    if node is None:
        return ""
    if isinstance(node, bool):
        return "true" if node else "false"
    return str(node)


@dataclass(frozen=True, slots=True)
class FieldTerm:
    path: str
    equal: bool
    value: str

    def matches(self, obj: Mapping[str, Any]) -> bool:
        return (field_value(obj, self.path) == self.value) is self.equal


@dataclass(frozen=True, slots=True)
class FieldSelector:
    terms: tuple[FieldTerm, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.terms

    def matches(self, obj: Mapping[str, Any]) -> bool:
        return all(term.matches(obj) for term in self.terms)


def _split_escaped(text: str) -> list[str]:
    """Split on commas not escaped with a backslash (fields.ParseSelector's rule)."""
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ",":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _parse_field_term(term: str, rtype: ResourceType, selector: str) -> FieldTerm:
    for op in _FIELD_OPS:
        key, sep, value = term.partition(op)
        if sep:
            break
    else:
        raise SelectorError(f"invalid selector: {selector!r}; can't understand {term!r}")
    key = key.strip()
    if key not in ("metadata.name", "metadata.namespace", *rtype.fields):
        raise SelectorError(f"field label not supported: {key}")
    return FieldTerm(key, op != "!=", value.strip())


def parse_field_selector(text: str | None, rtype: ResourceType) -> FieldSelector:
    """Parse `fieldSelector` against the field labels `rtype` supports."""
    if text is None or not text.strip():
        return FieldSelector()
    terms = [t for t in _split_escaped(text) if t.strip()]
    return FieldSelector(tuple(_parse_field_term(t, rtype, text) for t in terms))


@dataclass(frozen=True, slots=True)
class ObjectFilter:
    """Everything that narrows a list or watch: namespace, label and field selectors."""

    namespace: str | None = None
    labels: LabelSelector = LabelSelector()
    fields: FieldSelector = FieldSelector()

    @property
    def has_selectors(self) -> bool:
        return not (self.labels.empty and self.fields.empty)

    def in_namespace(self, namespace: str) -> bool:
        return self.namespace is None or self.namespace == namespace

    def matches(self, obj: Mapping[str, Any]) -> bool:
        """Selectors only: the namespace is checked separately (it is part of the key)."""
        if not self.labels.empty:
            labels = obj.get("metadata", {}).get("labels") or {}
            if not self.labels.matches(labels):
                return False
        return self.fields.empty or self.fields.matches(obj)
