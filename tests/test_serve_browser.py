"""End-to-end: the demo page in headless Chromium (Selenium + the system chromium/chromedriver).

Skipped cleanly when selenium, chromium or chromedriver is missing (``apt-get install chromium
chromium-driver``; ``pip install selenium``). Set ``SANA_SPRINT_UPDATE_DOCS=1`` to refresh
docs/serve.png from the screenshot.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
DOCS_PNG = Path(__file__).resolve().parents[1] / "docs" / "serve.png"
TIMEOUT = 60


@pytest.fixture
def driver():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed")
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium / chromedriver not installed")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1000,900"):
        opts.add_argument(arg)
    d = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    d.set_page_load_timeout(TIMEOUT)
    yield d
    d.quit()


@pytest.fixture
def server():
    from test_serve import tiny_engine

    from sana_sprint.serve import app

    srv, thread = app.serve_in_thread(tiny_engine(), "127.0.0.1", 0)
    yield f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def test_draw_stroke_updates_image(driver, server, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, TIMEOUT)
    driver.get(server)
    result = driver.find_element(By.ID, "result")
    # The page generates a text-only image on load.
    wait.until(lambda d: int(result.get_attribute("data-count")) >= 1)
    assert result.get_attribute("data-controlled") == "false"
    wait.until(lambda d: "RANDOM" in d.find_element(By.ID, "warning").text)
    before_src = result.get_attribute("src")
    before = int(result.get_attribute("data-count"))

    pad = driver.find_element(By.ID, "pad")
    actions = ActionChains(driver).move_to_element_with_offset(pad, -80, -70).click_and_hold()
    for _ in range(8):
        actions.move_by_offset(18, 16)
    actions.release().perform()

    wait.until(lambda d: int(result.get_attribute("data-count")) > before and result.get_attribute("data-controlled") == "true")
    # Let the coalesced follow-up request (the final stroke state) land too.
    wait.until(lambda d: d.execute_script("return !inFlight && !pending"))
    assert result.get_attribute("src") != before_src
    ink = driver.execute_script(
        "const c = document.getElementById('pad').getContext('2d').getImageData(0, 0, 256, 256).data;"
        "let n = 0; for (let i = 0; i < c.length; i += 4) if (c[i] < 128) n++; return n;"
    )
    assert ink > 100  # the stroke was drawn on the canvas

    latency_text = driver.find_element(By.ID, "latency").text
    assert latency_text.endswith(" ms")
    latency = float(latency_text.split()[0])
    assert 0 < latency < 60_000
    assert "scribble + text" in driver.find_element(By.ID, "status").text

    # Text-only mode: unticking the box regenerates without the scribble.
    count = int(result.get_attribute("data-count"))
    driver.find_element(By.ID, "use-scribble").click()
    wait.until(lambda d: int(result.get_attribute("data-count")) > count and result.get_attribute("data-controlled") == "false")
    driver.find_element(By.ID, "use-scribble").click()
    wait.until(lambda d: result.get_attribute("data-controlled") == "true" and d.execute_script("return !inFlight && !pending"))

    shot = tmp_path / "serve.png"
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 1000
    if os.environ.get("SANA_SPRINT_UPDATE_DOCS"):
        DOCS_PNG.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS_PNG)
