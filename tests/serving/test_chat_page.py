"""The chat page at / in a real headless browser (Debian's chromium + chromium-driver through
selenium): it streams a reply, honours the system prompt and the controls, and its stop button
cancels the request — the server frees the row. Skips, saying why, where they are absent."""

from __future__ import annotations

import shutil
import time

import pytest

from lmlab.serving import ServerConfig, create_app

selenium = pytest.importorskip("selenium", reason="selenium is not installed")
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium "
           "chromium-driver)")
KEY = "page-key"


@pytest.fixture(scope="module")
def page(tiny, live_server, slow_model):
    model, tok = tiny
    app = create_app(ServerConfig(model_name="tiny", api_key=KEY, max_running=4),
                     model=slow_model(model, delay=0.05), tokenizer=tok)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    with live_server(app) as server:
        driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER),
                                  options=options)
        try:
            driver.get(server.url + "/")
            driver.find_element(By.ID, "key").send_keys(KEY, Keys.TAB)  # change: lists models
            WebDriverWait(driver, 10).until(
                lambda d: d.find_element(By.ID, "model").get_property("value") == "tiny")
            yield driver, server
        finally:
            driver.quit()


def replies(driver) -> list[str]:
    return [e.get_property("textContent")
            for e in driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")]


def set_field(driver, name: str, value: str) -> None:
    field = driver.find_element(By.ID, name)
    field.clear()
    field.send_keys(value)


def test_reply_streams_and_stop_cancels_it(page):
    import httpx2 as httpx

    driver, server = page
    metrics = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"})

    def metric(name):
        line = next(l for l in metrics.get("/metrics").text.splitlines()
                    if l.startswith(name + " "))
        return float(line.split()[1])

    set_field(driver, "temperature", "0.8")
    set_field(driver, "max_tokens", "30")  # the prompt is 30 of 64
    driver.find_element(By.ID, "input").send_keys("hello there", Keys.ENTER)
    # text appears while the reply is still being written (stop is enabled): it streams
    WebDriverWait(driver, 10).until(
        lambda d: replies(d) and replies(d)[-1] and d.find_element(By.ID, "stop").is_enabled())
    partial = replies(driver)[-1]
    driver.find_element(By.ID, "stop").click()
    WebDriverWait(driver, 5).until(
        lambda d: d.find_element(By.ID, "status").text == "stopped")
    deadline = time.monotonic() + 5
    while metric("lmlab_running_rows") != 0:
        assert time.monotonic() < deadline, "the stopped reply kept decoding"
        time.sleep(0.05)
    assert metric("lmlab_cancelled_rows_total") == 1
    assert replies(driver)[-1].startswith(partial)
    assert metric("lmlab_generation_tokens_total") < 30


def test_system_prompt_and_controls_reach_the_model(page):
    import openai

    driver, server = page
    driver.find_element(By.ID, "reset").click()
    set_field(driver, "system", "You are terse.")
    set_field(driver, "temperature", "0")
    set_field(driver, "max_tokens", "6")
    driver.find_element(By.ID, "input").send_keys("hi", Keys.ENTER)
    WebDriverWait(driver, 15).until(
        lambda d: d.find_element(By.ID, "send").is_enabled() and replies(d))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    want = client.chat.completions.create(
        model="tiny", temperature=0, max_tokens=6,
        messages=[{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "hi"}])
    assert replies(driver) == [want.choices[0].message.content]
