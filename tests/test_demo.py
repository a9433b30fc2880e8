"""The README's main command, run as a user would (with --once so it stops by itself)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_serves_real_dns_answers_and_proxies_real_requests():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/demo.py"), "--once"],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert re.search(r"web\.shop\.svc\.cluster\.local\.\s+5\s+IN\s+A\s+10\.96\.10\.10", text)
    assert re.search(r"IN\s+AAAA\s+fd00:10:96::a", text)
    # shop/web is dual-stack: CoreDNS weighs its SRV over both ClusterIPs, 100 / 2.
    assert re.search(r"IN\s+SRV\s+0 50 80 web\.shop\.svc\.cluster\.local\.", text)
    assert re.search(r"db-0\.db\.data\.svc\.cluster\.local\.\s+5\s+IN\s+A\s+127\.0\.20\.1", text)
    assert "127.0.20.3" not in text  # db-2 is not ready
    assert re.search(r"IN\s+PTR\s+web\.shop\.svc\.cluster\.local\.", text)
    assert re.search(r"IN\s+CNAME\s+payments\.example\.com\..*\n.*IN\s+A\s+192\.0\.2\.10", text)
    assert "nothere.shop.svc.cluster.local A -> NXDOMAIN" in text
    served_by = re.findall(r"hello from (web-\d)", text)
    assert len(served_by) == 12
    # Round robin: every pod answers, each twice per six requests.
    assert sorted(served_by[:6]) == ["web-0", "web-0", "web-1", "web-1", "web-2", "web-2"]
