"""Run test code inside a private network namespace that has only loopback.

Ray binds to, and advertises, the machine's own network address even when told 127.0.0.1, so on a
machine whose address is unreachable or firewalled a local Ray instance hangs or fails. Inside a fresh
network namespace (`unshare -n`, then `ip link set lo up`) the only interface is loopback, and Ray
works on 127.0.0.1 alone. Creating the namespace needs root (CAP_SYS_ADMIN).

    reason = why_no_netns()            # None when it can be made here
    proc = run_in_netns([sys.executable, "-m", "pytest", ...], env=...)

The re-executed process gets MILKIT_PRIVATE_NETNS=1, which `in_private_netns()` checks together with
the interfaces it can see.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

NETNS_ENV = "MILKIT_PRIVATE_NETNS"
PROC_NET_DEV = Path("/proc/self/net/dev")  # per network namespace (/sys/class/net is the host's sysfs)
_SCRIPT = 'ip link set lo up && exec "$@"'


def interfaces() -> list[str]:
    """The network interfaces of this process's namespace."""
    try:
        lines = PROC_NET_DEV.read_text().splitlines()[2:]  # two header lines
    except OSError:
        return []
    return sorted(line.split(":", 1)[0].strip() for line in lines if ":" in line)


def in_private_netns() -> bool:
    """True inside a namespace made by run_in_netns: the marker is set and loopback is all there is."""
    return os.environ.get(NETNS_ENV) == "1" and interfaces() == ["lo"]


def netns_command(argv: Sequence[str]) -> list[str]:
    """`argv` run in a new network namespace whose loopback is up."""
    return ["unshare", "-n", "sh", "-c", _SCRIPT, "milkit-netns", *map(str, argv)]


@functools.lru_cache(maxsize=1)
def why_no_netns() -> str | None:
    """None when a private network namespace can be made here, else why not (for a skip)."""
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (util-linux / iproute2)"
    try:
        probe = subprocess.run(netns_command(["ip", "-o", "link", "show"]), capture_output=True, text=True,
                               timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`unshare -n` failed: {exc}"
    if probe.returncode != 0:
        return f"`unshare -n` + `ip link set lo up` failed (needs root): {' '.join(probe.stderr.split())[:200]}"
    links = probe.stdout.strip().splitlines()  # "1: lo: <LOOPBACK,UP,LOWER_UP> mtu ..." and nothing else
    if len(links) != 1 or " lo: " not in links[0] or ",UP" not in links[0]:
        return f"the new namespace is not loopback alone, up: {' | '.join(links)[:200]}"
    return None


def run_in_netns(argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 300,
                 cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run `argv` in a private network namespace, with NETNS_ENV=1 added to `env` (default: this one's)."""
    full_env = {**(os.environ if env is None else env), NETNS_ENV: "1"}
    return subprocess.run(netns_command(argv), env=full_env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
