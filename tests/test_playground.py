"""The playground page at `/` in a real headless browser (Debian's chromium + chromium-driver,
driven by selenium): it loads, a prompt streams text into both panes with live figures, and
the screenshot is kept as a test artifact."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
from _serve_util import ServerThread, make_models, served  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from kforcing.serving.engine import Engine  # noqa: E402

CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="Debian's chromium and chromium-driver are not installed "
    "(.ci/install-browser.sh installs them)")


def artifacts_dir() -> Path:
    root = Path(os.environ.get("KFORCING_ARTIFACTS") or Path(tempfile.gettempdir())
                / "kforcing-artifacts")
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture
def browser(tmp_path):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,800"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_playground_streams_both_panes(browser, tiny_corpus, tiny_tokenizer, tmp_path):
    _, student_dir = make_models(tmp_path, tiny_corpus.tokenizer_path, tiny_tokenizer)
    with ServerThread(Engine(served(student_dir)), max_batch=4) as srv:
        browser.get(srv.url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: "student" in d.find_element(By.ID, "model").text)
        assert [o.text for o in Select(browser.find_element(By.ID, "k")).options] == [
            "auto", "1", "2", "3", "4"]
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("The river")
        Select(browser.find_element(By.ID, "mode")).select_by_value("lossless")
        browser.find_element(By.ID, "seed").send_keys("42")
        tokens = browser.find_element(By.ID, "max_tokens")
        tokens.clear()
        tokens.send_keys("16")
        browser.find_element(By.ID, "run").click()
        wait.until(lambda d: d.find_element(By.ID, "run").is_enabled()
                   and "tokens/s" in d.find_element(By.ID, "stats-kf").text
                   and "length" in d.find_element(By.ID, "stats-ar").text)
        shot = artifacts_dir() / "playground.png"
        browser.save_screenshot(str(shot))
        print(f"playground screenshot: {shot}")
        generated = {tag: browser.find_elements(By.CSS_SELECTOR, f"#out-{tag} span")[1].text
                     for tag in ("ar", "kf")}
        stats = browser.find_element(By.ID, "stats-kf").text
    assert generated["ar"] and generated["kf"]
    # lossless spends the same noise as AR sampling: the two panes show the same text
    assert generated["ar"] == generated["kf"]
    assert "16 tokens" in stats and "tokens/pass" in stats
    assert shot.stat().st_size > 10_000
