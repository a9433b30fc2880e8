import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from kwatch.models import describe_error, object_key
from kwatch.resources import ENDPOINTSLICES, NODES, PODS, SERVICES


def svc(**spec):
    return {"metadata": {"name": "web", "namespace": "shop"}, "spec": spec}


def test_service_fields_parse_from_api_json_names():
    s = SERVICES.parse(
        svc(
            clusterIP="10.96.0.10",
            clusterIPs=["10.96.0.10", "fd00:0:0::a"],
            ports=[{"name": "http", "port": 80, "targetPort": "web", "nodePort": 30080}],
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
            externalTrafficPolicy="Local",
        )
    )
    assert s.key == "shop/web"
    assert s.cluster_ips == ["10.96.0.10", "fd00::a"]  # IPv6 canonicalised
    assert s.spec.ports[0].target_port == "web"
    assert s.spec.session_affinity_config.client_ip.timeout_seconds == 60
    assert s.spec.external_traffic_policy == "Local"


def test_headless_and_external_name_services():
    assert SERVICES.parse(svc(clusterIP="None")).is_headless
    ext = SERVICES.parse(svc(type="ExternalName", externalName="db.example.com"))
    assert ext.is_external_name and ext.cluster_ips == []


@pytest.mark.parametrize(
    "spec",
    [
        {"clusterIP": "10.0.0.256"},
        {"clusterIP": "010.0.0.1"},
        {"externalIPs": ["not-an-ip"]},
        {"ports": [{"port": 70000}]},
        {"ports": [{"port": 80, "protocol": "ICMP"}]},
    ],
)
def test_invalid_service_values_are_rejected_with_the_field_named(spec):
    with pytest.raises(ValidationError) as err:
        SERVICES.parse(svc(**spec))
    assert describe_error(err.value).split(":")[0].startswith("spec.")


def test_unknown_fields_and_annotations_are_dropped():
    s = SERVICES.parse(
        {
            "metadata": {
                "name": "a",
                "namespace": "b",
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "x" * 5000},
                "managedFields": [{"manager": "kubectl"}],
            },
            "spec": {"clusterIP": "10.0.0.1", "futureField": 1},
        }
    )
    assert s.metadata.annotations == {}


def test_only_the_labels_the_daemons_read_are_kept_and_empty_parts_are_shared():
    """Issue 15: a real cluster's `app.kubernetes.io/*` and Helm labels, uids and empty
    statuses cost megabytes at 10,000 Services; none of them is read."""
    real_labels = {
        "app.kubernetes.io/name": "web",
        "app.kubernetes.io/managed-by": "Helm",
        "helm.sh/chart": "web-1.0.0",
    }
    slice_ = ENDPOINTSLICES.parse(
        {
            "metadata": {
                "name": "web-abcde",
                "namespace": "shop",
                "uid": "0b7a6c1e-0000-4000-8000-000000000000",
                "labels": {**real_labels, "kubernetes.io/service-name": "web"},
            },
            "addressType": "IPv4",
            "endpoints": [
                {
                    "addresses": ["10.1.0.1"],
                    "targetRef": {"kind": "Pod", "name": "web-7d9f-x2k9p", "namespace": "shop"},
                }
            ],
        }
    )
    assert slice_.metadata.labels == {"kubernetes.io/service-name": "web"}
    assert not hasattr(slice_.metadata, "uid")
    ref = slice_.endpoints[0].target_ref
    assert (ref.kind, ref.name, ref.namespace) == ("Pod", "web-7d9f-x2k9p", "shop")
    one = SERVICES.parse(
        {
            "metadata": {"name": "a", "namespace": "b", "labels": real_labels},
            "spec": {"clusterIP": "10.0.0.1"},
            "status": {"loadBalancer": {}},
        }
    )
    two = SERVICES.parse(svc(clusterIP="10.0.0.2"))
    assert one.metadata.labels == {} and one.metadata.labels is two.metadata.annotations
    assert one.status is two.status
    lb = SERVICES.parse(
        {**svc(type="LoadBalancer"), "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}}
    )
    assert lb.status.load_balancer.ingress[0].ip == "192.0.2.1" and lb.status is not one.status


def test_endpointslice_conditions_default_to_ready_and_serving():
    es = ENDPOINTSLICES.parse(
        {
            "metadata": {
                "name": "web-abc",
                "namespace": "shop",
                "labels": {"kubernetes.io/service-name": "web"},
            },
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.1.0.1"]},
                {"addresses": ["10.1.0.2"], "conditions": {"ready": False, "terminating": True}},
                {"addresses": ["10.1.0.3"], "conditions": {"ready": False, "serving": True}},
            ],
            "ports": [{"name": None, "port": 8080}],
        }
    )
    assert es.service_name == "web"
    assert [e.is_ready for e in es.endpoints] == [True, False, False]
    assert [e.is_serving for e in es.endpoints] == [True, True, True]
    assert [e.is_terminating for e in es.endpoints] == [False, True, False]
    assert es.ports[0].name == ""


def test_fqdn_endpointslices_parse_as_empty():
    es = ENDPOINTSLICES.parse(
        {
            "metadata": {"name": "x", "namespace": "y"},
            "addressType": "FQDN",
            "endpoints": [{"addresses": ["db.example.com"]}],
        }
    )
    assert es.endpoints == []


def test_load_balancer_ingress_ip_mode():
    s = SERVICES.parse(
        {
            **svc(type="LoadBalancer", clusterIP="10.0.0.1"),
            "status": {
                "loadBalancer": {
                    "ingress": [
                        {"ip": "203.0.113.5", "ipMode": "Proxy"},
                        {"ip": "203.0.113.6", "ipMode": "VIP"},
                        {"ip": "203.0.113.7"},
                    ]
                }
            },
        }
    )
    assert [i.ip_mode for i in s.status.load_balancer.ingress] == ["Proxy", "VIP", None]
    with pytest.raises(ValidationError):
        SERVICES.parse(
            {**svc(), "status": {"loadBalancer": {"ingress": [{"ip": "1.2.3.4", "ipMode": "X"}]}}}
        )


def test_node_deletion_timestamp_and_taints():
    node = NODES.parse(
        {
            "metadata": {"name": "n1", "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {
                "podCIDR": "10.244.1.0/24",
                "taints": [
                    {"key": "ToBeDeletedByClusterAutoscaler", "value": "1767225600",
                     "effect": "NoSchedule"},
                    {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute",
                     "timeAdded": "2026-01-01T00:00:00Z"},
                ],
            },
        }
    )  # fmt: skip
    assert node.metadata.deletion_timestamp == "2026-01-01T00:00:00Z"
    assert [(t.key, t.value, t.effect) for t in node.spec.taints] == [
        ("ToBeDeletedByClusterAutoscaler", "1767225600", "NoSchedule"),
        ("node.kubernetes.io/unreachable", "", "NoExecute"),
    ]
    plain = NODES.parse({"metadata": {"name": "n2"}})
    assert plain.metadata.deletion_timestamp is None and plain.spec.taints == []


def test_pod_ips_fall_back_to_pod_ip():
    pod = PODS.parse({"metadata": {"name": "p", "namespace": "n"}, "status": {"podIP": "10.2.0.5"}})
    assert pod.ips == ["10.2.0.5"]


def test_object_key_without_validation():
    assert object_key({"metadata": {"name": "a", "namespace": "b"}}) == "b/a"
    assert object_key({"metadata": {"name": "node1"}}) == "node1"
    assert object_key({"metadata": {}}) is None
    assert object_key({}) is None


@given(st.text(max_size=40))
def test_ip_validation_never_crashes_on_arbitrary_text(text):
    try:
        s = SERVICES.parse(svc(clusterIP=text))
    except ValidationError:
        return
    assert text in ("", "None") or s.cluster_ips


def test_a_list_page_validated_from_json_equals_the_objects_parsed_one_by_one():
    """kwatch.resources.parse_list skips what the models leave out without building it;
    the result must be what parsing each object gives."""
    import orjson

    slice_ = {
        "metadata": {
            "name": "web-abcde",
            "namespace": "shop",
            "labels": {"kubernetes.io/service-name": "web", "app": "web"},
            "managedFields": [{"manager": "kube-controller-manager", "fieldsV1": {"f:x": {}}}],
            "ownerReferences": [{"kind": "Service", "name": "web", "uid": "u"}],
        },
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": ["10.1.0.1"],
                "conditions": {"ready": True},
                "nodeName": "n1",
                "zone": "z1",
                "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "shop", "uid": "p"},
            }
        ],
        "ports": [{"name": "http", "port": 8080}],
    }
    body = orjson.dumps(
        {"metadata": {"resourceVersion": "42", "continue": "next"}, "items": [slice_]}
    )
    items, rv, token = ENDPOINTSLICES.parse_list(body)
    assert (rv, token) == ("42", "next")
    assert items == [ENDPOINTSLICES.parse(slice_)]
    assert ENDPOINTSLICES.parse_list(b'{"metadata": {}, "items": null}') == ([], "", "")
    # An FQDN slice fails the page (the reflector then parses item by item) ...
    fqdn = {**slice_, "addressType": "FQDN"}
    fqdn["endpoints"] = [{"addresses": ["db.example.com"]}]
    with pytest.raises(ValidationError):
        ENDPOINTSLICES.parse_list(orjson.dumps({"items": [fqdn]}))
    # ... where it parses as an empty slice.
    assert ENDPOINTSLICES.parse(fqdn).endpoints == []
    with pytest.raises(ValidationError):
        SERVICES.parse_list(b"not json")


@pytest.mark.parametrize(
    "conditions",
    [
        {},
        {"ready": True},
        {"ready": False, "serving": True, "terminating": True},
        {"ready": "true"},
    ],
)
def test_endpoint_conditions_are_one_shared_instance_per_value(conditions):
    def parse():
        return ENDPOINTSLICES.parse(
            {
                "metadata": {"name": "s", "namespace": "n"},
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.0.0.1"], "conditions": dict(conditions)}],
            }
        ).endpoints[0]

    first, second = parse(), parse()
    assert first.conditions is second.conditions
    expected = {k: v == "true" if isinstance(v, str) else v for k, v in conditions.items()}
    assert first.conditions.ready == expected.get("ready")
    assert first.conditions.terminating == expected.get("terminating")


def test_endpoint_conditions_that_are_not_booleans_are_rejected():
    with pytest.raises(ValidationError):
        ENDPOINTSLICES.parse(
            {
                "metadata": {"name": "s", "namespace": "n"},
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": "maybe"}}],
            }
        )


def test_reference_names_can_be_left_out_and_references_shared():
    """Only dnsd's --endpoint-pod-names reads endpoint targetRef names: without it the daemons
    keep one nameless reference per kind and namespace (issue 15: 12 MB at 100,000)."""
    from kwatch.models import keep_reference_names

    def ref(name):
        return (
            ENDPOINTSLICES.parse(
                {
                    "metadata": {"name": "s", "namespace": "shop"},
                    "addressType": "IPv4",
                    "endpoints": [
                        {
                            "addresses": ["10.0.0.1"],
                            "targetRef": {"kind": "Pod", "name": name, "namespace": "shop"},
                        }
                    ],
                }
            )
            .endpoints[0]
            .target_ref
        )

    assert ref("web-1").name == "web-1"
    keep_reference_names(False)
    one, two = ref("web-1"), ref("web-2")
    assert one is two and (one.kind, one.name, one.namespace) == ("Pod", "", "shop")
    keep_reference_names(True)
    assert ref("web-3").name == "web-3"
