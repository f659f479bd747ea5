"""The chat page at ``/``, driven in a real headless Chromium (Debian's package, ``make browser``):
pick an image, ask, watch the answer stream in, continue the conversation."""
import os
import pathlib
import shutil

import pytest
from checkpoint_factory import ASSET_IMAGE
from serve_utils import data_url, image_message, post

CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1180,760"]
# Set to a folder (e.g. docs/images) to keep the screenshot; it always goes to the test's tmp folder.
SCREENSHOT_DIR = os.environ.get("STLLAVA_SCREENSHOT_DIR")


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra has it)")
    if not (os.path.exists(CHROMIUM) and CHROMEDRIVER):
        pytest.skip("chromium and chromedriver are not installed (`make browser` installs them from Debian's "
                    "packages; it needs root)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def test_chat_page_streams_answers_and_continues_the_conversation(start_server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    srv = start_server(window_s=0.0)
    wait = WebDriverWait(browser, 60)
    browser.get(srv.url + "/")
    wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny")
    browser.find_element(By.ID, "image").send_keys(os.path.abspath(ASSET_IMAGE))
    wait.until(lambda d: d.find_element(By.ID, "preview").is_displayed())
    tokens = browser.find_element(By.ID, "max_tokens")
    tokens.clear()
    tokens.send_keys("40")

    def ask(question: str, n: int) -> tuple[str, int]:
        browser.find_element(By.ID, "question").send_keys(question)
        browser.find_element(By.ID, "send").click()
        done = '.msg.assistant[data-done="true"]'
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, done)) == n)
        bubble = browser.find_elements(By.CSS_SELECTOR, done)[-1]
        assert "error" not in bubble.get_attribute("class"), bubble.text
        return bubble.get_attribute("textContent"), int(bubble.get_attribute("data-chunks"))

    q1, q2 = "What is shown in the image?", "Is it normal?"
    a1, chunks1 = ask(q1, 1)
    a2, chunks2 = ask(q2, 2)
    if SCREENSHOT_DIR:
        browser.save_screenshot(str(pathlib.Path(SCREENSHOT_DIR) / "serve_chat_page.png"))
    assert browser.save_screenshot(str(tmp_path / "chat.png"))

    # The page showed the answer piece by piece, and it is the server's greedy answer to the same
    # conversation (same image bytes, same settings) asked without the page.
    assert chunks1 > 1 and chunks2 > 1
    first = [image_message(q1, data_url(ASSET_IMAGE))]
    want1 = post(srv.url, "/v1/chat/completions", {"messages": first, "temperature": 0, "max_tokens": 40})[2]
    assert a1 == want1["choices"][0]["message"]["content"] and a1
    second = first + [{"role": "assistant", "content": a1}, {"role": "user", "content": q2}]
    want2 = post(srv.url, "/v1/chat/completions", {"messages": second, "temperature": 0, "max_tokens": 40})[2]
    assert a2 == want2["choices"][0]["message"]["content"]
    texts = [e.get_attribute("textContent") for e in browser.find_elements(By.CSS_SELECTOR, ".msg")]
    assert texts == [q1, a1, q2, a2]
