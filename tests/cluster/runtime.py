"""A container runtime's last steps, for one container of the cluster test (stdlib only).

    ip netns exec NODE python runtime.py SPEC.json

Run as root inside the node's network namespace and a private mount namespace (`ip netns exec`
makes one): builds the container's root as an overlay over `rootfs` (the mounted image, or /
when running from the checkout), mounts the volumes at their mountPaths, makes the root
read-only if asked, chroots into it, then sets what runc sets from an OCI process spec for a
Kubernetes container (supplementary groups cleared, gid, uid, the bounding, permitted and
effective capability sets to exactly the spec's, inheritable and ambient empty,
no_new_privs when allowPrivilegeEscalation is false) and execs the command with the spec's
environment, looked up on its PATH as runc does.

SPEC: {"rootfs", "scratch", "mounts": [{"source", "target", "readonly", "type"}],
"readonly_root", "argv", "env", "cwd", "uid", "gid", "caps", "no_new_privs"}.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 32, 4096, 16384
PR_SET_KEEPCAPS, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 8, 24, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522

CAPS = [
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
]  # fmt: skip

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {source} on {target}",
    )


def in_root(root: str, path: str) -> str:
    """`path` inside `root` with every symlink resolved against root, not the host (as runc's
    securejoin: /var/run -> /run must land in the container's /run)."""
    parts = [p for p in path.split("/") if p]
    current = ""
    for _ in range(64):  # bounded: symlink loops end here
        if not parts:
            break
        part = parts.pop(0)
        if part == "..":
            current = current.rsplit("/", 1)[0]
            continue
        candidate = f"{current}/{part}"
        full = root + candidate
        if os.path.islink(full):
            target = os.readlink(full)
            parts = [p for p in target.split("/") if p] + parts
            if target.startswith("/"):
                current = ""
            continue
        current = candidate
    return root + current


def _mkpoint(path: str, is_file: bool) -> None:
    if is_file:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.exists(path):
            open(path, "a").close()
    else:
        os.makedirs(path, exist_ok=True)


def build_root(spec: dict[str, object]) -> str:
    scratch = str(spec["scratch"])
    os.makedirs(scratch, exist_ok=True)
    mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    upper, work, root = (os.path.join(scratch, d) for d in ("upper", "work", "root"))
    for d in (upper, work, root):
        os.mkdir(d)
    mount(
        "overlay", root, "overlay", 0, f"lowerdir={spec['rootfs']},upperdir={upper},workdir={work}"
    )
    mounts = list(spec["mounts"])  # type: ignore[call-overload]
    for path, mode in spec.get("chmod") or []:  # type: ignore[attr-defined]
        os.chmod(in_root(root, path), mode)
    for item in mounts:
        target = in_root(root, item["target"])
        kind = item.get("type", "bind")
        if kind == "tmpfs":
            _mkpoint(target, False)
            mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, item.get("options"))
        elif kind == "proc":
            _mkpoint(target, False)
            mount("proc", target, "proc", MS_NOSUID | MS_NODEV, None)
        else:
            _mkpoint(target, os.path.isfile(item["source"]))
            mount(item["source"], target, None, MS_BIND | MS_REC, None)
            if item.get("readonly"):
                mount("none", target, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
    if spec.get("readonly_root"):
        mount("overlay", root, None, MS_REMOUNT | MS_RDONLY, None)
    return root


def set_privileges(spec: dict[str, object]) -> None:
    keep = {CAPS.index(name) for name in spec["caps"]}  # type: ignore[attr-defined]
    last = int(open("/proc/sys/kernel/cap_last_cap").read())
    for cap in range(last + 1):
        if cap not in keep:
            _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop {cap} from bounding")
    uid, gid = int(spec["uid"]), int(spec["gid"])  # type: ignore[call-overload]
    _check(_libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "keepcaps")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    mask = sum(1 << cap for cap in keep)
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)(
        mask & 0xFFFFFFFF, mask & 0xFFFFFFFF, 0, mask >> 32, mask >> 32, 0
    )  # effective, permitted, inheritable for caps 0-31, then 32-63
    _check(_libc.capset(header, data), "capset")
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "ambient clear")
    _check(_libc.prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0), "keepcaps off")
    if spec.get("no_new_privs"):
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def main(argv: list[str]) -> int:
    with open(argv[1]) as handle:
        spec = json.load(handle)
    root = build_root(spec)
    os.chroot(root)
    os.chdir(spec.get("cwd") or "/")
    set_privileges(spec)
    env = dict(spec["env"])
    command = list(spec["argv"])
    try:
        os.execvpe(command[0], command, env)  # PATH from the container's environment
    except OSError as err:
        print(f"runtime: exec {command[0]}: {err}", file=sys.stderr, flush=True)
        return 127
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv))
