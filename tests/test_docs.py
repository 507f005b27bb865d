"""The contracts users touch are documented: every metric name appears in docs/metrics.md."""

from __future__ import annotations

from pathlib import Path

from tb_gateway.metrics import Metrics

DOCS = Path(__file__).parents[1] / "docs"


def test_every_metric_is_documented() -> None:
    doc = (DOCS / "metrics.md").read_text()
    names = {metric.name for metric in Metrics().registry.collect()}
    # counters are collected without their _total suffix
    missing = sorted(n for n in names if f"`{n}`" not in doc and f"`{n}_total`" not in doc)
    assert missing == []
