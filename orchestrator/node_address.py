"""`python -m orchestrator.node_address IP`: give this network namespace (a container's) the address `IP` as well.

A Ray node in a container behind Docker's NAT advertises its machine's address (RAY_NODE_IP: the one other
machines reach it at, through the ports the container publishes), but inside the container that address is no
interface. Most of Ray binds every interface and is reached through the published ports; a few of its processes
bind the advertised address itself and are reached only from their own node (the runtime-env agent that the
raylet asks before starting a worker, the dashboard agent's HTTP server, the Ray Client server). Adding the
address to the container's loopback (as /32, label `lo:ray`) lets those bind, and keeps the node's connections
to itself inside the container. Needs CAP_NET_ADMIN (docker/compose.worker.yaml runs it as root, then starts Ray
as the image's user without that capability); pure ioctl, so the image needs no iproute2.
"""
from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
import sys

SIOCGIFADDR, SIOCSIFADDR, SIOCSIFNETMASK = 0x8915, 0x8916, 0x891C  # <linux/sockios.h>
LABEL = "lo:ray"


def _ifreq(name: str, ip: str) -> bytes:
    """struct ifreq with a sockaddr_in: 16-byte name, family, port, address, padding."""
    return struct.pack("16sHH4s8s", name.encode(), socket.AF_INET, 0, socket.inet_aton(ip), b"\0" * 8)


def has_address(ip: str) -> bool:
    """Whether a socket can bind `ip` here (it is one of this namespace's addresses)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, 0))
        except OSError:
            return False
    return True


def add_address(ip: str, label: str = LABEL) -> bool:
    """Add `ip`/32 to the loopback under `label`; False when it is already an address here."""
    ipaddress.IPv4Address(ip)  # ValueError for anything else
    if has_address(ip):
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, SIOCSIFADDR, _ifreq(label, ip))  # the kernel gives it its class's mask first,
        fcntl.ioctl(s, SIOCSIFNETMASK, _ifreq(label, "255.255.255.255"))  # narrowed at once to the one address
    return True


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m orchestrator.node_address IP", file=sys.stderr)
        return 2
    try:
        added = add_address(argv[0])
    except ValueError:
        print(f"node_address: {argv[0]!r} is not an IPv4 address (set RAY_NODE_IP to this machine's address)",
              file=sys.stderr)
        return 2
    except PermissionError:
        print("node_address: adding an address needs CAP_NET_ADMIN (cap_add: [NET_ADMIN], run as root)", file=sys.stderr)
        return 1
    print(f"node_address: {argv[0]} {'added to ' + LABEL if added else 'already an address here'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
