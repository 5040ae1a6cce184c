"""orchestrator/node_address.py, which docker/compose.worker.yaml runs before Ray: in a fresh network namespace
(`unshare -n`, root only) the advertised address becomes bindable as a /32 on the loopback, and only that one
address; a second run changes nothing; a bad address is one line and exit 2."""
import os
import shutil
import subprocess
import sys

import pytest

from orchestrator.node_address import main

CODE = """
import socket, subprocess, sys
from orchestrator.node_address import add_address, has_address
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
assert not has_address("10.9.8.7")
assert add_address("10.9.8.7") is True and add_address("10.9.8.7") is False
socket.socket().bind(("10.9.8.7", 0))          # the few Ray processes that bind the advertised address can
assert not has_address("10.9.8.8")              # its class's /8 was narrowed to the one address
print(subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True).stdout)
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"),
                    reason="needs root, unshare and ip: a network namespace of its own")
def test_the_address_is_added_to_a_fresh_namespace_as_one_address():
    r = subprocess.run(["unshare", "-n", sys.executable, "-c", CODE], capture_output=True, text=True)
    if "Operation not permitted" in r.stderr and "unshare" in r.stderr:
        pytest.skip("this machine forbids new network namespaces")
    assert r.returncode == 0, r.stderr
    assert "inet 10.9.8.7/32 scope global lo:ray" in r.stdout


def test_a_bad_address_is_one_line_and_exit_2(capsys):
    assert main(["10.0.0.300"]) == 2
    assert capsys.readouterr().err == ("node_address: '10.0.0.300' is not an IPv4 address (set RAY_NODE_IP to this "
                                      "machine's address)\n")
