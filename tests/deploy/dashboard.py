"""The Grafana dashboard as data: its PromQL expressions, with Grafana's variables filled in."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

from tests.deploy.live import DEPLOY

DASHBOARD_PATH = DEPLOY / "grafana" / "dashboards" / "moestream.json"
DATASOURCE_VARIABLE = "DS_PROMETHEUS"
# Our metric names are snake_case with an underscore, unlike image tags (moestream:latest)
# and addresses (moestream:8000).
METRIC_NAME = re.compile(r"\bmoestream:[a-z0-9]+(?:_[a-z0-9]+)+\b")
# $name, ${name}, ${name:format}, [[name]]
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref_id: str
    expr: str

    @property
    def id(self) -> str:
        return f"{self.panel}/{self.ref_id}"


def load_dashboard() -> dict:
    return json.loads(DASHBOARD_PATH.read_text())


def panels(dashboard: dict) -> Iterator[dict]:
    """Every panel, those inside collapsed rows too."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def panel_queries(dashboard: dict) -> list[PanelQuery]:
    return [PanelQuery(p["title"], t["refId"], t["expr"])
            for p in panels(dashboard) for t in p.get("targets", [])]


def variable_queries(dashboard: dict) -> list[str]:
    """The label_values(...) definitions of the query variables."""
    return [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]


def substitute(expr: str, values: dict[str, str]) -> str:
    """`expr` with each Grafana variable replaced; KeyError names a variable not in `values`."""
    return _VARIABLE.sub(lambda m: values[next(g for g in m.groups() if g)], expr)
