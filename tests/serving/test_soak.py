"""``dsla-serve bench soak``, short: six seconds of the full mix against a real keyed server on loopback."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from dsla_serve.cli import app as cli_app
from dsla_serve.serving.api.auth import Keys
from tests.serving.conftest import start_server

API, ADMIN = "soak-api-key", "soak-admin-key"


def test_short_soak_loses_nothing_and_leaves_nothing_running(tokenizer, tmp_path):
    api = {"keys": Keys(API, ADMIN), "max_body_bytes": 64 << 10}
    with start_server(tokenizer, ctrl={"policy": "static", "conversion": 0.0}, api=api) as srv:
        args = ["bench", "soak", "--minutes", "0.1", "--url", srv.url, "--api-key", API, "--admin-key", ADMIN,
                "--concurrency", "4", "--control-every", "0.5", "--body-limit", "64KiB", "--out", str(tmp_path)]  # fmt: skip
        result = CliRunner().invoke(cli_app, args)
        assert result.exit_code in (0, 1), result.output  # 1: a target missed, read below which
        report = json.loads((tmp_path / "soak.json").read_text())
        assert srv.engine.snapshot().state["policy"] == "static"  # the server's own policy is restored
    q = report["requests"]
    assert q["lost"] == 0 and q["server_errors"] == 0, q["lost_examples"]
    assert q["completed"] > 10 and q["dropped_by_client"] > 0 and q["warm_up"]["completed"] == 4
    assert q["bad"]["sent"] > 0 and q["bad"]["rejected_as_expected"] == q["bad"]["sent"], q["bad"]["unexpected"]
    assert q["sent"] == q["completed"] + q["failed"] + q["dropped_by_client"] + q["bad"]["sent"]
    c = report["control"]
    assert c["level_changes"] >= 5 and not c["failed"] and c["layers_folded"] > 0  # folds while requests ran
    assert report["polls"]["sent"] > 0 and not report["polls"]["failed"]
    assert report["left_running"] == {"sequences": 0, "queue_depth": 0, "used_bytes": 0}
    rss = report["rss_bytes"]
    assert rss["start"] > 0 and rss["end"] > 0 and report["latency_s"]["p99"] > 0
    assert report["ok"] == (rss["growth"] <= 0.05) and result.exit_code == (0 if report["ok"] else 1)
