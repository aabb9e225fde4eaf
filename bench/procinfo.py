"""The server's processes and their memory, found from the port it listens on (Linux
/proc), so the report can show RSS and KB per connection without being told a pid."""
from __future__ import annotations

import os


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    local, state, inode = fields[1], fields[3], fields[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        inodes.add(inode)
        except OSError:
            continue
    return inodes


def server_pids(port: int) -> list[int]:
    """Every process holding the listening socket (uvicorn's workers share it)."""
    inodes = {f"socket:[{i}]" for i in _listening_inodes(port)}
    pids: list[int] = []
    if not inodes:
        return pids
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                    pids.append(int(entry))
                    break
            except OSError:
                continue
    return sorted(pids)


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


class Server:
    """The processes behind one port; only the serving ones (a supervisor that merely
    holds the socket, like uvicorn's parent with --workers, is left out when it has
    children doing the work)."""

    def __init__(self, port: int) -> None:
        pids = server_pids(port)
        parents = {self._ppid(p) for p in pids}
        workers = [p for p in pids if p not in parents]
        self.pids = workers or pids

    @staticmethod
    def _ppid(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            return -1

    def rss_kb(self) -> int:
        return sum(rss_kb(p) for p in self.pids)

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids)


# What a process is, for the CPU breakdown of a run on one machine: the first marker
# found in its command line names it.
_ROLES = (("postgres", "postgres"), ("run_agents", "agents_worker"), ("redis-server", "redis"))


def cpu_by_role(server: list[int]) -> dict[str, float]:
    """CPU seconds so far of the server's processes, the agents workers, PostgreSQL's
    and Redis's processes (all of them on this machine), this load tool, and the whole
    machine (every core's busy time): subtract two of these to see where a window's CPU
    went. Processes that end inside the window are missed; the machine's figure is not."""
    out = {"server": sum(cpu_seconds(p) for p in server), "load_tool": cpu_seconds(os.getpid())}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in server:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for marker, role in _ROLES:
            if marker in cmd:
                out[role] = out.get(role, 0.0) + cpu_seconds(int(entry))
                break
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    # Busy: everything but idle and iowait.
    out["machine"] = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    return out
