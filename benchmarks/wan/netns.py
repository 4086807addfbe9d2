"""A shaped WAN between two Linux network namespaces (test and benchmark tooling, never product code).

    with ShapedLink(rate_bit_s=100e6, one_way_delay_s=0.020) as link:
        link.run_in("active", [...])   # a command inside the active party's namespace
        link.run_in("passive", [...])  # the passive party dials link.active_address

Layout: namespaces `<prefix>-a` (active) and `<prefix>-p` (passive) joined by a veth pair 10.77.N.1 <-> 10.77.N.2.
Both veth ends shape their egress to the link rate. The propagation delay comes from `tc netem` where the
kernel has it (then netem does rate and delay together); otherwise from `delay_relay.py` running in the
active namespace: the passive party dials the relay at 10.77.N.1:relay_port, which holds every chunk
`one_way_delay_s` in each direction and passes it to the active party on the namespace's loopback. The
parties cannot tell: they see a TCP peer `rate` away with the delay. What the relay does not copy: TCP's own
slow start and window limits over the long round trip (the relay terminates TCP), so the shaped link is a
little kinder than a real one.

Everything is removed on exit, on an exception and on Ctrl-C / SIGTERM (the namespaces are deleted, which
deletes the veth pair; processes started in them are killed first). Needs root (`ip netns add`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

RELAY = Path(__file__).with_name("delay_relay.py")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def namespaces_available() -> tuple[bool, str]:
    """Whether this process can create network namespaces and veth pairs (and why not)."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return False, "the `ip` and `tc` commands (iproute2) are not installed"
    if os.geteuid() != 0:
        return False, "creating network namespaces needs root"
    name = f"hpprobe{os.getpid()}"
    probe = _ip("netns", "add", name, check=False)
    if probe.returncode != 0:
        return False, f"`ip netns add` failed: {probe.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return True, ""


def netem_available() -> bool:
    """Whether `tc qdisc ... netem` works here (these machines' kernels often lack sch_netem)."""
    ns = f"hpnetem{os.getpid()}"
    if _ip("netns", "add", ns, check=False).returncode != 0:
        return False
    try:
        _ip("-n", ns, "link", "set", "lo", "up", check=False)
        r = subprocess.run(
            ["tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
            capture_output=True,
            text=True,
        )
        return r.returncode == 0
    finally:
        _ip("netns", "del", ns, check=False)


class ShapedLink:
    """Two namespaces joined by a veth pair with the given rate and one-way delay. A context manager."""

    def __init__(
        self,
        rate_bit_s: float,
        one_way_delay_s: float,
        prefix: str | None = None,
        active_port: int = 47000,
        relay_port: int = 47001,
        use_netem: bool | None = None,
    ) -> None:
        self.rate_bit_s, self.delay = rate_bit_s, one_way_delay_s
        tag = prefix or f"vfl{os.getpid() % 100000}"
        self.ns = {"active": f"{tag}-a", "passive": f"{tag}-p"}
        self.veth = {"active": f"{tag}a"[:15], "passive": f"{tag}p"[:15]}
        subnet = 64 + os.getpid() % 180
        self.ip = {"active": f"10.77.{subnet}.1", "passive": f"10.77.{subnet}.2"}
        self.active_port, self.relay_port = active_port, relay_port
        self.use_netem = netem_available() if use_netem is None else use_netem
        self.processes: list[subprocess.Popen] = []
        self._relay: subprocess.Popen | None = None
        self._old_term = None

    # The passive party dials this; the active party listens on `active_listen` inside its namespace.
    @property
    def active_address(self) -> str:
        port = self.active_port if self.use_netem else self.relay_port
        return f"{self.ip['active']}:{port}"

    @property
    def active_listen(self) -> str:
        return f"{self.ip['active']}:{self.active_port}" if self.use_netem else f"127.0.0.1:{self.active_port}"

    def __enter__(self) -> ShapedLink:
        self._old_term = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_term)
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _on_term(self, signum, frame) -> None:
        raise KeyboardInterrupt("SIGTERM")

    def _create(self) -> None:
        a, p = self.ns["active"], self.ns["passive"]
        for ns in (a, p):
            _ip("netns", "del", ns, check=False)  # a leftover of a killed run
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip(
            "link",
            "add",
            self.veth["active"],
            "netns",
            a,
            "type",
            "veth",
            "peer",
            "name",
            self.veth["passive"],
            "netns",
            p,
        )
        for party in ("active", "passive"):
            ns, dev = self.ns[party], self.veth[party]
            _ip("-n", ns, "addr", "add", f"{self.ip[party]}/24", "dev", dev)
            # Segmentation offload would let tbf pass 64 KiB bursts above the rate: keep packets MTU-sized.
            _ip("-n", ns, "link", "set", "dev", dev, "gso_max_size", "1500", "gro_max_size", "1500", check=False)
            _ip("-n", ns, "link", "set", "dev", dev, "up")
            self._shape(ns, dev)
        if not self.use_netem:
            self._relay = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    a,
                    sys.executable,
                    str(RELAY),
                    "--listen",
                    f"{self.ip['active']}:{self.relay_port}",
                    "--target",
                    f"127.0.0.1:{self.active_port}",
                    "--delay",
                    str(self.delay),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            line = self._relay.stdout.readline()
            if "relaying" not in line:
                raise RuntimeError(f"the delay relay did not start: {line}")

    def _shape(self, ns: str, dev: str) -> None:
        rate = f"{int(self.rate_bit_s)}bit"
        if self.use_netem:
            cmd = [
                "tc",
                "-n",
                ns,
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "netem",
                "rate",
                rate,
                "delay",
                f"{self.delay * 1e6:.0f}us",
                "limit",
                "100000",
            ]
        else:
            # The bucket must hold at least one tick's worth of bytes (HZ=250: 4 ms), and a few packets.
            burst = max(16 * 1514, int(self.rate_bit_s / 8 * 0.004))
            cmd = [
                "tc",
                "-n",
                ns,
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                str(burst),
                "latency",
                "200ms",
            ]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")

    def run_in(self, party: str, command: list[str], **popen) -> subprocess.Popen:
        """Start `command` inside the party's namespace (killed on close if still running)."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns[party], *command], **popen)
        self.processes.append(proc)
        return proc

    def close(self) -> None:
        for proc in [*self.processes, *([self._relay] if self._relay else [])]:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5
        for proc in [*self.processes, *([self._relay] if self._relay else [])]:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for ns in self.ns.values():
            _ip("netns", "del", ns, check=False)
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)
            self._old_term = None

    def describe(self) -> str:
        how = "tc netem (rate + delay)" if self.use_netem else "tc tbf (rate) + delay relay"
        return (
            f"{self.rate_bit_s / 1e6:g} Mbit/s, {self.delay * 2e3:g} ms round trip via {how}; "
            f"namespaces {self.ns['active']} / {self.ns['passive']}"
        )


def link_of_cluster(cluster: str) -> tuple[float, float]:
    """(rate bit/s, one-way delay s) of the WAN link between the first two sites of a cluster spec."""
    from hwmodel.catalog import load_cluster

    spec = load_cluster(cluster)
    sites = spec.sites
    if len(sites) < 2 or spec._wan(sites[0], sites[1]) is None:
        raise SystemExit(f"cluster {spec.name!r} has no WAN link between two sites")
    link = spec._wan(sites[0], sites[1])
    return link.bandwidth * 8, link.latency


def main() -> None:
    """Run one VFL job with each party in its own namespace over the shaped link, then remove everything."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(
        description="Run `execute vfl run` with the active party in one network namespace and the passive party in "
        "another, joined by a link shaped like the cluster's WAN link; everything is removed afterwards.",
        epilog="example: sudo .venv/bin/python benchmarks/wan/netns.py --cluster two-sites-wan -- --plan plan.yaml "
        "--workload vfl-wdl-tiny --epochs 2",
    )
    parser.add_argument("--cluster", default="two-sites-wan", help="cluster spec whose WAN link to copy")
    parser.add_argument("--rate", type=float, help="override: link rate in bit/s")
    parser.add_argument("--delay", type=float, help="override: one-way delay in seconds")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="options for both parties' `execute vfl run` (after --)")
    opts = parser.parse_args()
    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root))
    from executor.vfl.cli import party_command_line
    from executor.vfl.keys import make_keys

    ok, why = namespaces_available()
    if not ok:
        raise SystemExit(f"cannot create network namespaces: {why}")
    rate, delay = link_of_cluster(opts.cluster)
    rate, delay = opts.rate or rate, opts.delay if opts.delay is not None else delay
    args = [a for a in opts.args if a != "--"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    with tempfile.TemporaryDirectory(prefix="vfl-netns-") as tmp, ShapedLink(rate, delay) as link:
        make_keys(Path(tmp))
        print(link.describe(), flush=True)
        active = link.run_in(
            "active", party_command_line("active", Path(tmp), link.active_listen, args), env=env, cwd=root
        )
        time.sleep(0.5)
        passive = link.run_in(
            "passive",
            party_command_line("passive", Path(tmp), link.active_address, [*args, "--quiet"]),
            env=env,
            cwd=root,
        )
        codes = (active.wait(), passive.wait())
    sys.exit(max(codes))


if __name__ == "__main__":
    main()
