"""The web page at ``/``, driven in a real headless Chromium against a real node."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from node_process import start_doubled_swarm, start_node, stop_node
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
        assert user.get_attribute("data-raw") == MESSAGE
        assert reply.get_attribute("data-raw") == greedy_reply(path)  # the text as streamed; shown as markdown
        assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error")
        # The page's markdown escapes whatever a model writes before it formats it.
        html = driver.execute_script("return markdown(arguments[0]);", "<img src=x onerror=alert(1)> **b** `c`\n```py\n<i>\n```")
        assert "<img" not in html and "&lt;img" in html and "<strong>b</strong>" in html and "<code>c</code>" in html
        assert "<pre><code>&lt;i&gt;\n</code></pre>" in html
    finally:
        driver.quit()
        stop_node(node)


# The map is drawn anew every second: read it in one script, or an element found in one
# call may be gone by the next.
def spans_on_map(driver) -> list[tuple[str, int, int, str]]:
    rows = driver.execute_script("return [...document.querySelectorAll('#peers .peer')].map("
                                 "r => [r.dataset.peer, +r.dataset.start, +r.dataset.end, r.dataset.state]);")  # fmt: skip
    return sorted(tuple(row) for row in rows)


def on_map(driver, selector: str, what: str) -> list[str]:
    """``what`` (a property path of each element, e.g. ``dataset.route``) of every ``selector`` on the map."""
    return driver.execute_script(f"return [...document.querySelectorAll('{selector}')].map(e => e.{what});")


def test_the_map_shows_the_swarm_its_answers_and_a_kill(tmp_path):
    """A 3-hop swarm (M [0, 2) with the API, two servers of [2, 3), Y [3, 4)): the map
    draws every span; a running answer's route shows its three hops; the chat's Stop
    ends it; a killed server is marked unreachable on the map."""
    path = cached_tiny_model("llama", layers=4, hidden=64)
    nodes = start_doubled_swarm(path, tmp_path)
    m, doubled = nodes[0], nodes[1:3]
    driver = browser(tempfile.mkdtemp(dir=tmp_path))
    try:
        driver.get(m.url + "/")
        wait = WebDriverWait(driver, 30)
        want = sorted((n.peer_id, *span, "online") for n, span in zip(nodes, [(0, 2), (2, 3), (2, 3), (3, 4)]))
        wait.until(lambda d: spans_on_map(d) == want)
        assert on_map(driver, "#coverage .cell", "textContent") == ["1", "1", "2", "1"]

        for field, value in (("temp", "0"), ("max", "2000")):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.find_element(By.ID, "input").send_keys(MESSAGE)
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: ":" in "".join(on_map(d, "#answers .answer", "dataset.route")))  # routed
        route = on_map(driver, "#answers .answer", "dataset.route")[0].split(",")
        assert [hop.split(":")[1] for hop in route] == ["0-2", "2-3", "3-4"]
        assert route[0].split(":")[0] == m.peer_id and route[1].split(":")[0] in {n.peer_id for n in doubled}
        driver.save_screenshot(str(tmp_path / "swarm.png"))

        driver.find_element(By.ID, "stop").click()
        wait.until(lambda d: d.find_element(By.ID, "send").is_enabled() and not d.find_element(By.ID, "stop").is_enabled())
        reply = driver.find_element(By.CSS_SELECTOR, ".msg.assistant")
        assert "(stopped)" in reply.text
        stopped = reply.get_attribute("data-raw")
        wait.until(lambda d: not on_map(d, "#answers .answer", "dataset.route"))  # the gateway let it go
        assert reply.get_attribute("data-raw") == stopped

        victim = next(n for n in doubled if n.peer_id == route[1].split(":")[0])
        victim.proc.kill()
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: any(p == victim.peer_id and state == "unreachable" for p, _, _, state in spans_on_map(d))
                   or victim.peer_id not in {p for p, *_ in spans_on_map(d)})
    finally:
        driver.quit()
        for node in nodes:
            stop_node(node)
