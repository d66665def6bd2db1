"""`omni serve` from the outside: the chat page driven in headless Chromium, and the command
itself in a subprocess (binds 127.0.0.1, one log line per request)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from test_serve import NAME, ckpt, free_port, model, serving  # noqa: F401  (fixtures)

CHROMIUM = os.environ.get("OMNI_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
OMNI = Path(sys.executable).with_name("omni")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package `chromium`)")
def test_chat_page_in_chromium(model, tmp_path):  # noqa: F811
    sync_api = pytest.importorskip("playwright.sync_api")
    picture = tmp_path / "blue.png"
    Image.new("RGB", (40, 40), (40, 80, 220)).save(picture)
    with serving(model) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_function(f"document.getElementById('model').textContent === '{NAME}'")
            page.evaluate("""() => {  // record whether a progress bar ever appears
                window.sawProgress = false;
                new MutationObserver(() => { if (document.querySelector('progress')) window.sawProgress = true; })
                    .observe(document.getElementById('chat'), {childList: true, subtree: true});
            }""")

            # 1: a question about an attached picture, answered in text
            page.select_option("#mode", "text")
            page.set_input_files("#file", str(picture))
            page.wait_for_selector("#attached img")
            page.fill("#prompt", "what color is the square?")
            page.press("#prompt", "Enter")
            page.wait_for_selector(".msg.assistant .meta", timeout=60_000)
            assert page.locator(".msg.user img").count() == 1  # the attachment went with the message
            answer = page.locator(".msg.assistant .text").first.inner_text()
            assert answer.strip() and "error" not in answer

            # 2: a drawing, in the same conversation
            page.select_option("#mode", "image")
            page.fill("#prompt", "draw a red circle")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.msg.assistant .meta').length === 2", timeout=60_000)
            img = page.locator(".msg.assistant").nth(1).locator("img")
            assert img.count() == 1
            assert page.evaluate("(el) => el.complete && el.naturalWidth", img.element_handle()) == 32
            assert img.get_attribute("src").startswith("data:image/png;base64,")
            assert page.evaluate("window.sawProgress") is True
            assert page.evaluate("messages.length") == 4  # two turns kept for the next request

            page.click("#reset")
            assert page.locator(".msg").count() == 0 and page.evaluate("messages.length") == 0
            assert not errors, errors
        finally:
            browser.close()


def test_omni_serve_command(ckpt, tmp_path):  # noqa: F811
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(OMNI), "serve", "--ckpt", str(ckpt), "--port", str(port), "--max-batch", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "omni serve did not come up"
                time.sleep(0.2)
        assert health["model"] == NAME and health["max_running"] == 4
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
            "model": NAME, "messages": [{"role": "user", "content": "a red circle"}], "mode": "image", "seed": 1})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"][0]["type"] == "image_url"
        bad = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", content=b"{", timeout=10)
        assert bad.status_code == 400
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    lines = [line for line in out.splitlines() if " omni.serve INFO req-" in line]
    assert len(lines) == 3, out  # one line per request: health, the drawing, the bad one
    assert "GET /health 200" in lines[0] and "POST /v1/chat/completions 200" in lines[1] and "images=1" in lines[1]
    assert "POST /v1/chat/completions 400" in lines[2] and "error=invalid_json" in lines[2]
    assert "127.0.0.1" in lines[1]
    assert "Traceback" not in out
