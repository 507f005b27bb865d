"""`tb-gateway rpc --timeout`: a positive, finite number of seconds, checked before the gateway is asked."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gateway_process import GatewayProcess


@pytest.mark.parametrize("timeout", ["0", "-1", "inf", "nan"])
def test_rpc_timeout_must_be_positive_and_finite(tmp_path: Path, timeout: str) -> None:
    result = GatewayProcess(tmp_path / "gw").cli("rpc", "dev", "reboot", "--timeout", timeout, check=False)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith("error: --timeout must be positive and finite (seconds), not ")
    assert len(result.stderr.splitlines()) == 1
