"""The playground page in a real headless browser (Debian's chromium through Selenium): it lists the
models, streams a diffusion request with its trace, shows masked slots being filled, and ends with
the same text as the API. A screenshot lands in test-artifacts/playground.png."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from tests.conftest import API_KEY

pytestmark = pytest.mark.ray
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
PROMPT = "def fibonacci(n):\n"


@pytest.fixture
def browser(tmp_path):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Debian's chromium and chromium-driver are not installed (make test installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    session = webdriver.Chrome(service=Service(driver), options=options)
    session.set_window_size(1280, 1400)
    yield session
    session.quit()


def test_playground_shows_a_block_being_filled(app, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    page = httpx.get(f"{app}/", timeout=30)
    assert page.status_code == 200 and "triserve playground" in page.text  # public, no key needed
    browser.get(f"{app}/")
    browser.execute_script("localStorage.setItem('triserve-key', arguments[0])", API_KEY)
    browser.refresh()
    wait = WebDriverWait(browser, 120)
    wait.until(
        lambda b: "tiny" in [o.get_attribute("value") for o in b.find_elements(By.CSS_SELECTOR, "#model option")]
    )
    Select(browser.find_element(By.ID, "model")).select_by_value("tiny")
    Select(browser.find_element(By.ID, "mode")).select_by_value("diffusion")
    for field, value in (("block-length", "8"), ("max-tokens", "24"), ("delay", "10"), ("prompt", PROMPT)):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    browser.find_element(By.ID, "run").click()
    wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-done") == "true")
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "playground.png"))

    def text(element_id: str) -> str:
        return browser.execute_script("return document.getElementById(arguments[0]).textContent", element_id)

    body = browser.find_element(By.TAG_NAME, "body")
    assert int(body.get_attribute("data-masked-shown")) > 0  # the view showed masked slots ...
    assert int(body.get_attribute("data-filled")) > 0  # ... and slots being committed
    assert "mode diffusion" in text("stats") and "NFE" in text("stats")
    api = httpx.post(
        f"{app}/v1/completions",
        json={
            "model": "tiny",
            "prompt": PROMPT,
            "max_tokens": 24,
            "temperature": 0,
            "decoding": {"mode": "diffusion", "block_length": 8},
        },
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    ).json()["choices"][0]["text"]
    assert text("view-text") == text("api-text") == api and api
