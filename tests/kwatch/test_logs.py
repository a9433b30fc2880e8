"""Log lines from processes sharing one stderr (dnsd's workers and forward child, kpx's
workers) stay whole: each is one JSON object a node's collector can parse."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import structlog

from kwatch.logs import LineLogger, configure_logging

WRITER = """
import sys
import structlog
from kwatch.logs import configure_logging
configure_logging("json", "info", "w" + sys.argv[1])
log = structlog.get_logger()
for i in range(int(sys.argv[2])):
    log.info("line", i=i, pad="x" * 40)
"""

ROOT = Path(__file__).resolve().parents[2]


def test_lines_from_processes_sharing_stderr_never_merge(tmp_path):
    out = tmp_path / "log"
    lines_each = 3000
    with out.open("wb") as sink:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", WRITER, str(n), str(lines_each)],
                stderr=sink,
                cwd=ROOT,
            )
            for n in range(3)
        ]
        for proc in procs:
            assert proc.wait(timeout=60) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    for n in range(3):
        mine = [r["i"] for r in records if r["daemon"] == f"w{n}"]
        assert mine == list(range(lines_each))


def test_a_stream_without_a_descriptor_gets_whole_lines():
    stream = io.StringIO()
    logger = LineLogger(stream)
    logger.info('{"a": 1}')
    logger.msg("two")
    assert stream.getvalue() == '{"a": 1}\ntwo\n'


def test_a_closed_descriptor_drops_the_line_without_raising(tmp_path):
    stream = (tmp_path / "f").open("w")
    logger = LineLogger(stream)
    stream.close()
    logger.msg("lost")  # EBADF: dropped, the daemon goes on


def test_configure_logging_renders_json_to_the_stream(capfd):
    configure_logging("json", "info", "unit")
    try:
        structlog.get_logger().warning("odd", n=3)
        err = capfd.readouterr().err.splitlines()
        record = json.loads(err[-1])
        assert record["event"] == "odd" and record["n"] == 3 and record["daemon"] == "unit"
    finally:
        structlog.reset_defaults()
