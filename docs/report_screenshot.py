"""Capture docs/report.png: the HTML report of a run in headless Chromium (selenium).

    xbench report results/reference_efficientnet-lite0_sample_quick --output /tmp/report.html
    python docs/report_screenshot.py /tmp/report.html docs/report.png

Needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver) and
selenium (the test extra), as tests/test_report.py does.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path


def capture(page: Path, out: Path, width: int = 1400, height: int = 1000) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    profile = tempfile.mkdtemp(prefix="xbench-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", f"--user-data-dir={profile}",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(page.resolve().as_uri())
        if not driver.save_screenshot(str(out)):
            raise SystemExit(f"could not write {out}")
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    capture(Path(sys.argv[1]), Path(sys.argv[2]))
