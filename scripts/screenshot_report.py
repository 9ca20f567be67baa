"""Manual check: render a `moeprune report` page in headless Chromium and save a screenshot.

Usage: python scripts/screenshot_report.py REPORT_DIR [OUT.png] [--height 2400]

Needs the Debian `chromium` package (not part of the test suite: CI has no browser).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path, help="folder written by `moeprune report` (or its index.html)")
    ap.add_argument("out", type=Path, nargs="?", default=Path("report_screenshot.png"))
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=2400)
    args = ap.parse_args()

    page = args.report if args.report.suffix == ".html" else args.report / "index.html"
    if not page.is_file():
        print(f"screenshot_report: no page at {page}", file=sys.stderr)
        return 2
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("screenshot_report: chromium not found (apt-get install -y chromium)", file=sys.stderr)
        return 2
    out = args.out.resolve()
    with tempfile.TemporaryDirectory() as profile_dir:
        cmd = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile_dir}",
            f"--screenshot={out}",
            f"--window-size={args.width},{args.height}",
            page.resolve().as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not out.is_file():
        print(proc.stderr[-2000:], file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
