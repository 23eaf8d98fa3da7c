"""bench/env_load.py runs as documented: a real serve-env process, client processes, no errors."""

from __future__ import annotations

import json

from bench.env_load import main


def test_env_load_bench_small_run(tmp_path, capsys):
    report = main(["--sessions", "20", "--steps-per-session", "2", "--sequential-calls", "20", "--think-ms", "0,5",
                   "--json", str(tmp_path / "report.json")])
    assert [row["think_ms"] for row in report["load"]] == [0, 5]
    for row in report["load"]:
        assert row["errors"] == 0 and row["step"]["n"] == 40 and row["create"]["n"] == row["close"]["n"] == 20
        assert row["open_sessions_seen_by_server"] == [20, 20] and row["open_after_close"] == 0
    assert report["sequential_raw"]["n"] == report["sequential_remote_env"]["n"] == 20
    assert json.loads((tmp_path / "report.json").read_text())["load"][1]["step"]["n"] == 40
    assert "20 sessions, think 5 ms" in capsys.readouterr().out
