"""The load balancer's configuration, checked by Debian's haproxy itself, and its runtime API
address refused when malformed. Replicas behind a running HAProxy are in test_serving_lb.py."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from lmpipe import balancer


def haproxy_check(path) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("haproxy") or "/usr/sbin/haproxy", "-c", "-f", str(path)],
                          capture_output=True, text=True, check=False)


def test_the_stack_configuration_with_tls_passes_haproxy_check(tmp_path):
    from serving_helpers import self_signed

    cert, key = self_signed(tmp_path)
    pem = tmp_path / "lb.pem"
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(balancer.config({"replica-1": "127.0.0.1:8101", "replica-2": "127.0.0.1:8102"}, "127.0.0.1:8000",
                                   str(tmp_path / "admin.sock"), tls_pem=str(pem)))
    r = haproxy_check(cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"bind 127.0.0.1:8000 ssl crt {pem}" in cfg.read_text()
    pem.write_text("not a certificate")
    assert haproxy_check(cfg).returncode != 0  # the check reads the PEM: it is a real oracle


@pytest.mark.parametrize("address", ["haproxy", "haproxy:", "haproxy:port", "127.0.0.1:70000", "admin.sock"])
def test_a_malformed_runtime_api_address_is_refused_naming_it(address):
    with pytest.raises(balancer.BalancerError, match="neither a socket path"):
        balancer.Runtime(address)


def test_an_unreachable_runtime_api_is_an_error_naming_it(tmp_path):
    with pytest.raises(balancer.BalancerError, match="unreachable"):
        balancer.Runtime(str(tmp_path / "no.sock")).servers()
