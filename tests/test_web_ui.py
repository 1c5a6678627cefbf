"""The web page at ``/``, driven in a real headless Chromium against a real node."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from node_process import start_node, stop_node
from transformers import AutoModelForCausalLM, AutoTokenizer

from shardmesh.tools.tiny_model import cached_tiny_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip(
        "web UI tests need Chromium and ChromeDriver (Debian: apt-get install chromium chromium-driver; "
        "`make test` installs them when run as root)",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow
MAX_TOKENS = 10
MESSAGE = "Tell me about the network."


def browser(profile: str) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1000,800",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def greedy_reply(path: Path) -> str:
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": MESSAGE}], add_generation_prompt=True, return_dict=False)
    out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def test_chat_page_streams_the_greedy_reply(tmp_path):
    path = cached_tiny_model("llama", layers=4, hidden=64)
    node = start_node(path)
    profile = tempfile.mkdtemp(dir=tmp_path)
    driver = browser(profile)
    try:
        driver.get(node.url + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("model: "))
        for field, value in (("temp", "0"), ("max", str(MAX_TOKENS))):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.find_element(By.ID, "input").send_keys(MESSAGE)
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_element(By.ID, "send").is_enabled() and d.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
        driver.save_screenshot(str(tmp_path / "chat.png"))
        [user] = driver.find_elements(By.CSS_SELECTOR, ".msg.user")
        [reply] = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        assert user.text == MESSAGE
        assert reply.get_attribute("textContent") == greedy_reply(path)
        assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error")
    finally:
        driver.quit()
        stop_node(node)
