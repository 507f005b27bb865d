"""docs/pipeline.md's delivery-contract table says what the transports' code answers for each outcome.

(Named test_cli_* for ownership reasons only: it checks the docs against the HTTP, CoAP and MQTT code.)
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tb_gateway.coap.codec import Code
from tb_gateway.coap.server import OUTCOME_CODES
from tb_gateway.config import Settings
from tb_gateway.http.handlers import Handlers, Request
from tb_gateway.http.wire import Answer
from tb_gateway.metrics import Metrics
from tb_gateway.mqtt import server as mqtt_server
from tb_gateway.records import DeviceIdentity
from tb_gateway.sinks.base import Outcome

PIPELINE_DOC = Path(__file__).parents[1] / "docs" / "pipeline.md"


def contract() -> dict[Outcome, dict[str, str]]:
    rows: dict[Outcome, dict[str, str]] = {}
    for line in PIPELINE_DOC.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`([A-Z_]+)`", cells[0])
        if match and len(cells) == 5:
            rows[Outcome[match.group(1)]] = {"http": cells[2], "coap": cells[3], "mqtt": cells[4]}
    return rows


def http_answer(outcome: Outcome) -> str:
    api: Any = SimpleNamespace(
        settings=Settings(kafka_enabled=False), metrics=Metrics(), downlink=None, rate_limit_wait_s=lambda _d: 2.0
    )
    request = Request(None, None, 0)
    request.device = DeviceIdentity("id-1", "dev")
    reply = Handlers(api, lambda: (True, {})).outcome(request, outcome)
    if isinstance(reply, Answer):
        return f"{reply.status}" + (" + Retry-After" if b"Retry-After" in reply.extra else "")
    return str(reply)


def coap_answer(outcome: Outcome) -> str:
    code = OUTCOME_CODES[outcome]
    dotted = f"{code >> 5}.{code & 0x1F:02d}"
    # the server adds Max-Age to every 5.03 (_outcome) and to a 4.29 (post): when to try again
    return dotted + (" + Max-Age" if code in (Code.SERVICE_UNAVAILABLE, Code.TOO_MANY_REQUESTS) else "")


def test_every_outcome_is_in_the_table() -> None:
    assert set(contract()) == set(Outcome)


@pytest.mark.parametrize("outcome", list(Outcome))
def test_http_and_coap_columns_match_the_code(outcome: Outcome) -> None:
    row = contract()[outcome]
    # a parenthesised note after the code (a variant, e.g. a rate-limited message that can never pass) is prose
    http, coap = (re.sub(r" \(.*\)$", "", cell) for cell in (row["http"], row["coap"]))
    assert (http, coap) == (http_answer(outcome), coap_answer(outcome))


@pytest.mark.parametrize("outcome", list(Outcome))
def test_mqtt5_column_matches_the_code(outcome: Outcome) -> None:
    code = mqtt_server._OUTCOME_V5[outcome]
    mqtt5 = contract()[outcome]["mqtt"].split(" / ")[0]
    expected = f"DISCONNECT 0x{-code:02X}" if code < 0 else f"PUBACK 0x{code:02X}" if code else "PUBACK 0x00"
    assert mqtt5.startswith(expected)
