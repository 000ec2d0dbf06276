"""The demo page at `/`: its files, then a real browser uploading and dropping photos."""

from __future__ import annotations

import re

import httpx
import pytest
from support.browser import browser_page
from support.paths import CAT, DATA

COFFEE = DATA / "coffee.jpg"
CAT_LABELS = {"tiger cat", "tabby", "Egyptian cat"}
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//|@import\s+url\(\s*["']?(?:https?:)?//|https?://""")


def test_page_and_assets_are_served_locally(tiny_server) -> None:
    page = httpx.get(f"{tiny_server.url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="static/app.js"' in page.text and 'href="static/style.css"' in page.text
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        asset = httpx.get(f"{tiny_server.url}/static/{name}", timeout=10)
        assert asset.status_code == 200 and kind in asset.headers["content-type"], name
        assert not EXTERNAL.search(asset.text), f"{name} refers to another host"
    assert not EXTERNAL.search(page.text)
    assert httpx.get(f"{tiny_server.url}/static/nope.js", timeout=10).status_code == 404


@pytest.mark.slow  # a browser
def test_upload_and_drop_show_top5_with_bars_and_time(pretrained_server, artifacts_dir) -> None:
    with browser_page() as (page, blocked):
        page.goto(f"{pretrained_server.url}/")
        select = page.locator("#model")
        page.wait_for_function("!document.querySelector('#model').disabled")
        assert select.input_value() == "efficientnet_lite0"

        # Pick a file with the chooser.
        page.set_input_files("#files", str(CAT))
        card = page.locator(".result").first
        card.locator(".top li").nth(4).wait_for()
        labels = card.locator(".top .label").all_inner_texts()
        assert len(labels) == 5
        assert labels[0] in CAT_LABELS, labels
        assert card.locator(".name").inner_text() == "cat.jpg"
        assert re.fullmatch(r"\d+ ms \(server: .*infer [\d.]+.* ms\)", card.locator(".time").inner_text())
        percents = [float(p.rstrip("%")) for p in card.locator(".top .pct").all_inner_texts()]
        assert percents == sorted(percents, reverse=True) and 80 <= sum(percents[:3]) <= 100.1
        widths = card.locator(".top .fill").evaluate_all("els => els.map(e => e.getBoundingClientRect().width)")
        assert widths[0] > widths[-1] > 0
        assert card.locator(".thumb").evaluate("img => img.complete && img.naturalWidth") > 0

        # Drop a second photo on the drop zone, as a person dragging a file would.
        data = list(COFFEE.read_bytes())
        page.evaluate(
            """([bytes, name]) => {
                const file = new File([new Uint8Array(bytes)], name, {type: "image/jpeg"});
                const transfer = new DataTransfer();
                transfer.items.add(file);
                const zone = document.querySelector("#drop");
                zone.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
            }""",
            [data, COFFEE.name],
        )
        page.locator(".result").nth(1).wait_for()
        newest = page.locator(".result").first
        newest.locator(".top li").nth(4).wait_for()
        assert newest.locator(".name").inner_text() == "coffee.jpg"
        assert page.locator(".result").count() == 2
        page.wait_for_function("document.querySelector('#status').textContent.startsWith('1 of 1 classified')")
        assert page.locator(".error:not([hidden])").count() == 0

        page.screenshot(path=str(artifacts_dir / "demo-page.png"), full_page=True)
        assert blocked == [], f"the page tried to reach other hosts: {blocked}"


@pytest.mark.slow  # a browser
def test_a_bad_file_shows_the_servers_error(tiny_server) -> None:
    with browser_page() as (page, blocked):
        page.goto(f"{tiny_server.url}/")
        page.wait_for_function("!document.querySelector('#model').disabled")
        page.select_option("#model", "tiny2")
        assert page.locator("#model-note").is_visible()  # random weights: the page says so
        page.set_input_files(
            "#files", files=[{"name": "notes.txt", "mimeType": "image/jpeg", "buffer": b"not an image"}]
        )
        error = page.locator(".result .error")
        error.wait_for()
        assert "not usable" in error.inner_text() or "not a recognised image" in error.inner_text()
        assert blocked == []
