#!/usr/bin/env bash
# Smoke test of kpx + dnsd in a kind cluster set up by deploy/kind/README.md: a Deployment and
# its Service, then from a client pod: DNS names (Service A, SRV, headless, PTR, kube-dns over
# TCP, an outside name), TCP to the Service's ClusterIP and NodePort through kpx, and the
# daemons' health. Needs kubectl pointing at the cluster; exits non-zero on the first failure.
# Not part of CI (no Docker engine there). Cleans up its namespace unless KEEP=1.
set -euo pipefail

NS=${NS:-kpx-smoke}
TIMEOUT=${TIMEOUT:-180s}
ctx=()
if [ -n "${CONTEXT:-}" ]; then ctx=(--context "$CONTEXT"); fi
k() { kubectl "${ctx[@]}" "$@"; }
say() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

cleanup() {
  if [ "${KEEP:-0}" != 1 ]; then k delete namespace "$NS" --wait=false >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

say "daemons ready"
k -n kpx-system rollout status daemonset/dnsd --timeout="$TIMEOUT"
k -n kpx-system rollout status daemonset/kpx --timeout="$TIMEOUT"
dns_ip=$(k -n kube-system get service kube-dns -o jsonpath='{.spec.clusterIP}')
proxy_name=$(k -n kube-system get service kube-dns \
  -o jsonpath='{.metadata.labels.service\.kubernetes\.io/service-proxy-name}')
[ "$proxy_name" = dnsd ] || fail "kube-dns is not labelled for dnsd (kubectl apply -k deploy/kube-dns)"
coredns=$(k -n kube-system get deployment coredns -o jsonpath='{.spec.replicas}' 2>/dev/null || echo 0)
[ "$coredns" = 0 ] || echo "note: CoreDNS still has $coredns replicas; answers may come from it"

say "workload: Deployment web (2 replicas), Services web (ClusterIP + NodePort) and web-headless"
k create namespace "$NS" --dry-run=client -o yaml | k apply -f -
k -n "$NS" apply -f - <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        image: registry.k8s.io/e2e-test-images/agnhost:2.53
        args: [netexec, --http-port=8080]
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {httpGet: {path: /, port: 8080}}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: web-headless}
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{name: http, port: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  containers:
  - name: client
    image: registry.k8s.io/e2e-test-images/agnhost:2.53
    command: [sleep, "3600"]
YAML
k -n "$NS" rollout status deployment/web --timeout="$TIMEOUT"
k -n "$NS" wait --for=condition=Ready pod/client --timeout="$TIMEOUT"

in_client() { k -n "$NS" exec client -- "$@"; }
cluster_ip=$(k -n "$NS" get service web -o jsonpath='{.spec.clusterIP}')
node_port=$(k -n "$NS" get service web -o jsonpath='{.spec.ports[0].nodePort}')
node_ip=$(k get nodes -o jsonpath='{.items[0].status.addresses[?(@.type=="InternalIP")].address}')

say "resolv.conf unchanged: nameserver $dns_ip"
in_client cat /etc/resolv.conf | grep -q "nameserver $dns_ip" || fail "client resolv.conf"

say "DNS (dig in the client pod, through the node's dnsd)"
answer=$(in_client dig +short +time=2 +tries=3 "web.$NS.svc.cluster.local" A)
[ "$answer" = "$cluster_ip" ] || fail "web.$NS A: got '$answer', want $cluster_ip"
answer=$(in_client dig +short +tcp +time=2 +tries=3 "web.$NS.svc.cluster.local" A)
[ "$answer" = "$cluster_ip" ] || fail "web.$NS A over TCP: got '$answer'"
answer=$(in_client dig +short +time=2 "_http._tcp.web.$NS.svc.cluster.local" SRV)
echo "$answer" | grep -q " 80 web.$NS.svc.cluster.local." || fail "SRV: '$answer'"
count=$(in_client dig +short +time=2 "web-headless.$NS.svc.cluster.local" A | grep -c . || true)
[ "$count" = 2 ] || fail "headless: $count addresses, want 2"
answer=$(in_client dig +short +time=2 -x "$cluster_ip")
[ "$answer" = "web.$NS.svc.cluster.local." ] || fail "PTR: '$answer'"
answer=$(in_client dig +short +time=2 "kubernetes.default.svc.cluster.local" A)
[ "$answer" = 10.96.0.1 ] || fail "kubernetes.default: '$answer'"
answer=$(in_client dig +short +time=2 @169.254.20.10 "web.$NS.svc.cluster.local" A)
[ "$answer" = "$cluster_ip" ] || fail "link-local 169.254.20.10: '$answer'"
in_client nslookup "web.$NS" >/dev/null || fail "search path (nslookup web.$NS)"
answer=$(in_client dig +short +time=3 +tries=2 kubernetes.io A | head -n 1)
[ -n "$answer" ] && echo "forwarded: kubernetes.io A $answer" \
  || echo "note: no answer for kubernetes.io (does the host reach the Internet?)"

say "TCP through kpx: ClusterIP, Service name, NodePort"
hostnames=""
for _ in 1 2 3 4 5 6; do
  name=$(in_client curl -sS --max-time 5 "http://$cluster_ip/hostname") || fail "ClusterIP $cluster_ip:80"
  hostnames+="$name"$'\n'
done
distinct=$(printf '%s' "$hostnames" | sort -u | grep -c .)
[ "$distinct" = 2 ] || fail "6 requests reached $distinct backends, want 2"
in_client curl -sS --max-time 5 "http://web.$NS/hostname" >/dev/null || fail "http://web.$NS"
in_client curl -sS --max-time 5 "http://$node_ip:$node_port/hostname" >/dev/null \
  || fail "NodePort $node_ip:$node_port"

say "no backend: connection refused at once, not a hang"
k -n "$NS" scale deployment/web --replicas=0
k -n "$NS" wait --for=delete pod -l app=web --timeout="$TIMEOUT"
sleep 2
start=$(date +%s)
if in_client curl -sS --max-time 10 "http://$cluster_ip/hostname" >/dev/null 2>&1; then
  fail "a Service without endpoints answered"
fi
[ $(( $(date +%s) - start )) -lt 5 ] || fail "a Service without endpoints hung"

say "health and metrics"
in_client curl -sS --max-time 5 "http://$node_ip:10256/healthz" | grep -q lastUpdated \
  || fail "kpx /healthz on $node_ip:10256"
in_client curl -sS --max-time 5 "http://$node_ip:9153/readyz" >/dev/null || fail "dnsd /readyz"

say "PASS"
