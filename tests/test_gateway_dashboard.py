"""The dashboard in headless Chromium (Debian's ``chromium``, driven by ``playwright``; no
browser download). Decisions come from the gateway running against the loopback upstream;
the screenshot lands in test-artifacts/gateway-dashboard.png."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from safetygame.backends.openai_compat import OpenAICompatBackend
from safetygame.bench.gateway import upstream_in_thread
from safetygame.gateway.app import GatewaySettings, create_app
from safetygame.gateway.auth import hash_key
from safetygame.gateway.server import serve_in_thread

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def _need_chromium() -> None:
    if not shutil.which(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("chromium missing in CI: apt-get install -y chromium")
        pytest.skip("chromium not installed (apt-get install -y chromium)")


def test_dashboard_renders_decisions(tmp_path: Path) -> None:
    _need_chromium()
    sync_api = pytest.importorskip("playwright.sync_api")
    key = "sg-dashboard-key-0123456789abcdefghij"
    other = "sg-other-key-0123456789abcdefghijklm"
    (tmp_path / "tenants.yml").write_text(
        f"tenants:\n  acme:\n    policy: default\n    keys: ['{hash_key(key)}']\n"
        f"  other:\n    policy: default\n    keys: ['{hash_key(other)}']\n"
    )
    with upstream_in_thread(latency=0.0) as up:
        backend = OpenAICompatBackend(up.url, max_retries=0)
        settings = GatewaySettings(
            tenants_file=tmp_path / "tenants.yml", audit_url=f"sqlite:///{tmp_path / 'a.db'}"
        )
        with serve_in_thread(create_app(backend, settings)) as url:
            auth = {"authorization": f"Bearer {key}"}
            prompts = [
                "How do I descale a kettle?",
                "Write a haiku about rain.",
                "Explain TCP slow start.",
                "<script>alert(1)</script> hi",
            ]
            for i, prompt in enumerate(prompts):
                budget = {"budget": 0.02} if i == 1 else {}
                r = httpx.post(
                    f"{url}/v1/chat/completions",
                    headers=auth,
                    timeout=30,
                    json={
                        "model": "safetygame",
                        "messages": [{"role": "user", "content": prompt}],
                        "safetygame": budget,
                    },
                )
                assert r.status_code == 200
            # Another tenant's decision must not show up on acme's dashboard.
            httpx.post(
                f"{url}/v1/chat/completions",
                timeout=30,
                headers={"authorization": f"Bearer {other}"},
                json={"model": "safetygame", "messages": [{"role": "user", "content": "x"}]},
            )

            with sync_api.sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
                try:
                    page = browser.new_page(viewport={"width": 1280, "height": 900})
                    errors: list[str] = []
                    page.on("pageerror", lambda e: errors.append(str(e)))
                    page.on("dialog", lambda d: errors.append("dialog: " + d.message))
                    page.goto(f"{url}/#key={key}")
                    page.wait_for_selector("body[data-loaded='4']", timeout=15_000)
                    ARTIFACTS.mkdir(exist_ok=True)
                    page.screenshot(path=str(ARTIFACTS / "gateway-dashboard.png"), full_page=True)
                    cards = page.locator("section.card")
                    assert cards.count() == 4
                    for i in range(4):
                        card = cards.nth(i)
                        assert card.locator("svg g.cand").count() == 5  # refusal + 4 samples
                        assert card.locator("svg line.budget-line").count() == 1
                        assert card.locator("svg polygon.mix").count() == 1
                    assert "tenant acme" in page.locator("#status").inner_text()
                    # Model and user text is shown as text, never run as markup.
                    assert (
                        page.get_by_text("<script>alert(1)</script> hi", exact=False).count() == 1
                    )
                    assert not errors, errors
                    # The key left the URL (it sits in sessionStorage, not in history).
                    assert "key=" not in page.url
                finally:
                    browser.close()
        import asyncio

        asyncio.run(backend.aclose())


@pytest.mark.parametrize("fragment", ["#key=%E0%A4%A", "#key=%", "#key="])
def test_malformed_key_fragment_does_not_leave_the_page_loading(
    tmp_path: Path, fragment: str
) -> None:
    _need_chromium()
    sync_api = pytest.importorskip("playwright.sync_api")
    backend = OpenAICompatBackend("http://127.0.0.1:9/v1", max_retries=0)  # never called
    settings = GatewaySettings(audit_url=f"sqlite:///{tmp_path / 'a.db'}")
    with serve_in_thread(create_app(backend, settings)) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{url}/{fragment}")
            status = page.locator("#status")
            sync_api.expect(status).not_to_have_text("loading…", timeout=10_000)
            assert "malformed" in status.inner_text()
            assert not errors, errors
            assert "key=" not in page.url  # whatever it held, it left the URL
        finally:
            browser.close()
