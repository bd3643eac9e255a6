"""The web page in headless Chromium, against a real `xmodal serve` (tiny model) on loopback.

Screenshots land in test-artifacts/browser/ at the repository root (ignored by git). The
module skips when Debian's Chromium is missing or Playwright cannot launch it.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

try:
    from playwright.sync_api import Browser, Expect, Page, Response, sync_playwright
except ImportError:  # pragma: no cover - playwright is a dev extra
    pytest.skip("playwright is not installed (pip install -e '.[dev]')", allow_module_level=True)

from tests.conftest import image_bytes
from tests.e2e.server import ServerProcess

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"
API_KEY = "browser-test-key"
OK = re.compile(r"\bupload-ok\b")
FAILED = re.compile(r"\bupload-error\b")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"{CHROMIUM} not found (apt install chromium)"
    ),
]

# Auto-waiting assertions with a generous timeout: the machine may be shared and slow.
expect = Expect()
expect.set_options(timeout=30_000)


def _shot(page: Page, name: str, *, full_page: bool = True) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


def _mime(path: Path) -> str:
    return "image/jpeg" if path.suffix == ".jpeg" else "image/png"


def _wait_loaded(page: Page, css: str) -> None:
    """Wait until the image matched by a CSS selector has really been loaded and decoded."""
    page.locator(css).first.scroll_into_view_if_needed()  # thumbnails load lazily
    page.wait_for_function(
        "css => { const img = document.querySelector(css);"
        " return !!img && img.complete && img.naturalWidth > 0; }",
        arg=css,
    )


def _error_message(response: httpx.Response) -> str:
    assert response.status_code >= 400, response.text
    return str(response.json()["error"]["message"])


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    with sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True, timeout=60_000
            )
        except Exception as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            pytest.skip(f"Playwright cannot launch {CHROMIUM}: {first_line}")
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for seed in range(6):
        fmt = "JPEG" if seed % 2 else "PNG"
        path = folder / f"photo{seed}.{fmt.lower()}"
        path.write_bytes(image_bytes(seed, fmt, size=(96 + 8 * seed, 72)))
        paths.append(path)
    return paths


def _serve(tmp_path_factory: pytest.TempPathFactory, *extra: str) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path_factory.mktemp("server") / "data", *extra).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(chromium: Browser, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # (takes `chromium` so that no server starts when the browser cannot)
    yield from _serve(tmp_path_factory)


@pytest.fixture(scope="module")
def keyed_server(
    chromium: Browser, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    yield from _serve(tmp_path_factory, "--api-key", API_KEY)


@pytest.fixture(scope="module")
def library(server: ServerProcess, photos: list[Path]) -> dict[str, int]:
    """The photos indexed through the API (uploading them again answers the existing ids)."""
    files = [("files", (p.name, p.read_bytes(), _mime(p))) for p in photos]
    response = httpx.post(f"{server.url}/v1/images", files=files, timeout=120)
    assert response.status_code == 201, response.text
    return {item["filename"]: item["id"] for item in response.json()["items"]}


class PageErrors:
    """Uncaught exceptions and console errors of a page (failed HTTP loads excepted)."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("console", self._console)

    def _console(self, msg: Any) -> None:
        if msg.type == "error" and not msg.text.startswith("Failed to load resource"):
            self.errors.append(f"console: {msg.text}")


@pytest.fixture
def open_page(chromium: Browser) -> Iterator[Any]:
    """open_page(url, **context_options) -> a fresh tab (own sessionStorage) on the page.

    With url=None the tab stays blank, for listeners that must see the first requests.
    """
    contexts = []
    watchers: list[PageErrors] = []

    def factory(url: str | None, **options: Any) -> Page:
        options.setdefault("viewport", {"width": 1280, "height": 900})
        context = chromium.new_context(**options)
        contexts.append(context)
        page = context.new_page()
        watchers.append(PageErrors(page))
        if url is not None:
            page.goto(url)
        return page

    yield factory
    for context in contexts:
        context.close()
    assert [e for w in watchers for e in w.errors] == []


def _open_ready(open_page: Any, server: ServerProcess, **options: Any) -> Page:
    page: Page = open_page(server.url, **options)
    expect(page.locator("#info")).to_contain_text("xmodal-tiny")
    expect(page.locator("#results")).not_to_have_attribute("aria-busy", "true")
    return page


def _text_search(page: Page, query: str) -> None:
    page.locator("#query").fill(query)
    page.locator("#query").press("Enter")
    expect(page.locator("#results-heading")).to_contain_text(query)
    expect(page.locator("#results")).not_to_have_attribute("aria-busy", "true")  # answered


# ---------------------------------------------------------------------------------------------
# Tests


def test_upload_several_images(open_page: Any, server: ServerProcess, photos: list[Path]) -> None:
    page = _open_ready(open_page, server)
    page.locator("#upload-input").set_input_files([str(p) for p in photos])
    rows = page.locator("#upload-list .upload-row")
    expect(rows).to_have_count(len(photos))
    for path in photos:
        row = page.locator(f'.upload-row[data-filename="{path.name}"]')
        expect(row).to_have_class(OK)
        expect(row.locator(".upload-msg")).to_have_text(
            re.compile(r"(Indexed|Already in the collection) \(#\d+\)")
        )
    expect(page.locator("#upload-summary")).to_have_text(
        f"{len(photos)} files: {len(photos)} indexed"
    )
    # The collection view refreshes once the uploads are done, and so does the info line.
    expect(page.locator("#results .result")).to_have_count(len(photos))
    expect(page.locator("#info")).to_contain_text(f"{len(photos)} images")
    ids = {rows.nth(i).get_attribute("data-id") for i in range(len(photos))}
    shown = {
        page.locator("#results .result").nth(i).get_attribute("data-id") for i in range(len(photos))
    }
    assert ids == shown and None not in ids
    _shot(page, "01-upload")


def test_text_search_shows_thumbnails(
    open_page: Any, server: ServerProcess, library: dict[str, int]
) -> None:
    page = _open_ready(open_page, server)
    _text_search(page, "a red bicycle by a wall")
    results = page.locator("#results .result")
    expect(results).to_have_count(len(library))
    expect(page.locator("#status")).to_contain_text(f"{len(library)} results")
    expect(results.first.locator(".score")).to_have_text(re.compile(r"score -?\d\.\d{3}"))
    expect(results.first.locator(".filename")).to_have_text(re.compile(r"photo\d\.(png|jpeg)"))
    _wait_loaded(page, "#results .result:first-child img.thumb")
    src = results.first.locator("img.thumb").get_attribute("src")
    assert src is not None and re.search(r"/v1/images/\d+/thumbnail$", src)
    expect(page.locator("#results img.broken")).to_have_count(0)
    _shot(page, "02-text-search")


def test_more_like_this(open_page: Any, server: ServerProcess, library: dict[str, int]) -> None:
    page = _open_ready(open_page, server)
    _text_search(page, "anything")
    results = page.locator("#results .result")
    expect(results).to_have_count(len(library))
    third = results.nth(2)
    clicked = third.get_attribute("data-id")
    name = third.locator(".filename").inner_text()
    assert clicked and clicked != results.first.get_attribute("data-id")
    third.locator(".more-like-this").click()
    expect(page.locator("#results-heading")).to_have_text(f"Images like {name}")
    expect(results.first).to_have_attribute("data-id", clicked)
    expect(results.first.locator(".score")).to_have_text("score 1.000")
    _shot(page, "03-more-like-this")


def test_search_by_chosen_and_dropped_file(
    open_page: Any, server: ServerProcess, photos: list[Path], library: dict[str, int]
) -> None:
    page = _open_ready(open_page, server)
    results = page.locator("#results .result")

    chosen = photos[3]
    page.locator("#image-input").set_input_files(str(chosen))
    expect(page.locator("#results-heading")).to_have_text(f"Images like {chosen.name}")
    expect(results.first).to_have_attribute("data-id", str(library[chosen.name]))
    expect(page.locator("#query-image")).to_be_visible()
    expect(page.locator("#query-image-name")).to_have_text(chosen.name)
    _wait_loaded(page, "#query-image-preview")
    _shot(page, "04-search-by-file")

    # A real drop event carrying a file, as a drag from the desktop would deliver it.
    dropped = photos[4]
    transfer = page.evaluate_handle(
        """([b64, name, type]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, { type }));
            return dt;
        }""",
        [base64.b64encode(dropped.read_bytes()).decode(), dropped.name, _mime(dropped)],
    )
    zone = page.locator("#drop-zone")
    zone.dispatch_event("dragenter", {"dataTransfer": transfer})
    expect(zone).to_have_class(re.compile(r"\bdragover\b"))
    zone.dispatch_event("drop", {"dataTransfer": transfer})
    expect(zone).not_to_have_class(re.compile(r"\bdragover\b"))
    expect(page.locator("#results-heading")).to_have_text(f"Images like {dropped.name}")
    expect(results.first).to_have_attribute("data-id", str(library[dropped.name]))
    expect(page.locator("#query-image-name")).to_have_text(dropped.name)

    page.locator("#query-image-clear").click()
    expect(page.locator("#query-image")).to_be_hidden()
    expect(page.locator("#results-heading")).to_have_text("Collection")


def test_upload_and_search_errors(
    open_page: Any, server: ServerProcess, photos: list[Path], library: dict[str, int]
) -> None:
    not_png = b"these are words, not pixels\n" * 4
    expected_upload = _error_message(
        httpx.post(
            f"{server.url}/v1/images",
            files={"files": ("notes.png", not_png, "image/png")},
            timeout=60,
        )
    )
    bad_filter = {"album": {"$regex": "x"}}
    expected_search = _error_message(
        httpx.post(
            f"{server.url}/v1/search/text",
            json={"query": "x", "filter": bad_filter},
            timeout=60,
        )
    )

    page = _open_ready(open_page, server)
    expect(page.locator("#results .result")).to_have_count(len(library))
    page.locator("#upload-input").set_input_files(
        [
            {"name": "notes.png", "mimeType": "image/png", "buffer": not_png},
            {"name": photos[0].name, "mimeType": "image/png", "buffer": photos[0].read_bytes()},
        ]
    )
    bad_row = page.locator('.upload-row[data-filename="notes.png"]')
    expect(bad_row).to_have_class(FAILED)
    expect(bad_row.locator(".upload-msg")).to_have_text(expected_upload)
    expect(bad_row.locator("progress")).to_have_count(0)
    good_row = page.locator(f'.upload-row[data-filename="{photos[0].name}"]')
    expect(good_row).to_have_class(OK)
    expect(good_row).to_contain_text(f"Already in the collection (#{library[photos[0].name]})")
    expect(page.locator("#upload-summary")).to_have_text("2 files: 1 indexed, 1 failed")
    # a refused file is a row of its own, not a page-wide error
    expect(page.locator("#error")).to_be_hidden()

    # The server refuses the filter: its message is shown.
    page.locator(".filter-box summary").click()
    page.locator("#filter").fill(json.dumps(bad_filter))
    page.locator("#query").fill("x")
    page.locator("#query").press("Enter")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error-text")).to_have_text(expected_search)
    # The collection shown before is gone: it must not pass for the answer to this query.
    expect(page.locator("#results-heading")).to_have_text("Images matching “x”")
    expect(page.locator("#results .result")).to_have_count(0)
    _shot(page, "05-errors")

    # Not JSON at all: the page says so without asking the server.
    page.locator("#filter").fill("{oops")
    page.locator("#search-btn").click()
    expect(page.locator("#error-text")).to_have_text("The metadata filter is not valid JSON.")
    page.locator("#error-close").click()
    expect(page.locator("#error")).to_be_hidden()

    # A good filter searches again and clears the message.
    page.locator("#filter").fill("{}")
    page.locator("#search-btn").click()
    expect(page.locator("#results .result")).to_have_count(len(library))
    expect(page.locator("#error")).to_be_hidden()


def test_image_to_text_mode(
    open_page: Any, server: ServerProcess, photos: list[Path], library: dict[str, int]
) -> None:
    texts = ["a dog on a beach", "a city at night", "a bowl of fruit", "snow on a mountain"]
    response = httpx.post(
        f"{server.url}/v1/texts",
        json={"items": [{"text": t, "metadata": {"lang": "en"}} for t in texts]},
        timeout=60,
    )
    assert response.status_code == 201, response.text

    page = _open_ready(open_page, server)
    expect(page.locator("#info")).to_contain_text(f"{len(texts)} texts")
    page.locator("#image-input").set_input_files(str(photos[1]))
    expect(page.locator("#results").locator(".result").first).to_have_attribute(
        "data-id", str(library[photos[1].name])
    )
    # Switching the mode re-runs the image query against the text corpus.
    page.locator("#mode").select_option("texts")
    expect(page.locator("#results-heading")).to_have_text(f"Texts matching {photos[1].name}")
    text_results = page.locator("#results .result-text")
    expect(text_results).to_have_count(len(texts))
    expect(page.locator("#results img")).to_have_count(0)
    shown = sorted(text_results.locator(".text").all_inner_texts())
    assert shown == sorted(texts)
    expect(text_results.first.locator(".metadata")).to_contain_text("lang")
    _shot(page, "06-image-to-text")

    # The "Texts" button on an image result does the same for a stored image.
    page.locator("#mode").select_option("images")
    expect(page.locator("#results .result-text")).to_have_count(0)
    page.locator("#results .result").first.locator(".find-texts").click()
    expect(page.locator("#mode")).to_have_value("texts")
    expect(text_results).to_have_count(len(texts))


def test_api_key_asked_once(
    open_page: Any, keyed_server: ServerProcess, photos: list[Path]
) -> None:
    page: Page = open_page(None)
    unauthorized: list[str] = []

    def on_response(response: Response) -> None:
        if response.status == 401:
            unauthorized.append(response.url)

    page.on("response", on_response)
    page.goto(keyed_server.url)

    form = page.locator("#auth-form")
    expect(form).to_be_visible()
    expect(page.locator("#api-key")).to_be_focused()
    _shot(page, "07-api-key-prompt")
    page.locator("#api-key").fill(API_KEY)
    page.locator("#api-key-save").click()
    expect(form).to_be_hidden()
    expect(page.locator("#info")).to_contain_text("xmodal-tiny")
    expect(page.locator("#status")).to_have_text("No images yet: add some below.")

    # Everything else works with the key: uploads (XHR), searches (fetch), thumbnails (blob URLs).
    page.locator("#upload-input").set_input_files([str(p) for p in photos[:3]])
    expect(page.locator(".upload-row.upload-ok")).to_have_count(3)
    expect(page.locator("#results .result")).to_have_count(3)
    _text_search(page, "keyed")
    expect(page.locator("#results .result")).to_have_count(3)
    _wait_loaded(page, "#results .result:first-child img.thumb")
    src = page.locator("#results .result img.thumb").first.get_attribute("src")
    assert src is not None and src.startswith("blob:")
    page.locator("#results .result").nth(1).locator(".more-like-this").click()
    expect(page.locator("#results-heading")).to_contain_text("Images like")
    first = page.locator("#results .result").first
    expect(first.locator(".score")).to_have_text("score 1.000")
    # The full image opens in the page (a plain link would answer 401).
    first.locator(".thumb-link").click()
    expect(page.locator("#viewer")).to_be_visible()
    _wait_loaded(page, "#viewer-img")
    _shot(page, "07-api-key-viewer", full_page=False)
    page.keyboard.press("Escape")
    expect(page.locator("#viewer")).to_be_hidden()

    # The key lasts for the tab: a reload does not ask again.
    page.reload()
    expect(page.locator("#results .result")).to_have_count(3)
    expect(form).to_be_hidden()
    expect(page.locator("#error")).to_be_hidden()
    assert len(unauthorized) == 1, unauthorized
    assert unauthorized[0].endswith("/v1/info")


def test_api_key_rejected_then_accepted(open_page: Any, keyed_server: ServerProcess) -> None:
    page: Page = open_page(keyed_server.url)
    form = page.locator("#auth-form")
    expect(form).to_be_visible()
    page.locator("#api-key").fill("not-the-key")
    page.locator("#api-key-save").click()
    expect(page.locator("#error-text")).to_have_text("The API key was not accepted.")
    expect(form).to_be_visible()
    page.locator("#api-key").fill(API_KEY)
    page.locator("#api-key-save").click()
    expect(form).to_be_hidden()
    expect(page.locator("#info")).to_contain_text("xmodal-tiny")
    expect(page.locator("#error")).to_be_hidden()


def test_phone_width_has_no_horizontal_scroll(
    open_page: Any, server: ServerProcess, photos: list[Path], library: dict[str, int]
) -> None:
    width = 375
    page = _open_ready(
        open_page,
        server,
        viewport={"width": width, "height": 800},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
    )

    def assert_fits() -> None:
        # Neither the page nor a box inside it scrolls sideways (long words must wrap).
        assert page.evaluate("document.scrollingElement.scrollWidth") <= width
        wide = page.evaluate(
            """() => [...document.querySelectorAll("body *")]
                .filter((e) => e.offsetParent !== null && e.scrollWidth > e.clientWidth + 1
                    && getComputedStyle(e).overflowX !== "visible"
                    && !["INPUT", "TEXTAREA", "SELECT"].includes(e.tagName)
                    && !e.closest(".visually-hidden, .filename, .upload-name, .metadata dd"))
                .map((e) => `${e.tagName}#${e.id}.${e.className}`)"""
        )
        assert wide == []

    # Long unbroken words everywhere text comes from the user or the server. The good file has
    # the bytes of a stored photo: a duplicate, so the collection is unchanged.
    long_word = "holiday-photo-" + "x" * 70
    page.locator("#upload-input").set_input_files(
        [
            {"name": f"{long_word}.png", "mimeType": "image/png", "buffer": photos[0].read_bytes()},
            {"name": f"notes-{long_word}.png", "mimeType": "image/png", "buffer": b"text"},
        ]
    )
    expect(page.locator(".upload-row.upload-ok")).to_have_count(1)
    expect(page.locator(".upload-row.upload-error")).to_have_count(1)
    _text_search(page, f"a long query with {long_word} in it")
    expect(page.locator("#results .result")).to_have_count(len(library))
    _wait_loaded(page, "#results .result:first-child img.thumb")
    assert_fits()
    _shot(page, "08-phone")

    page.locator(".filter-box summary").click()
    page.locator("#filter").fill(f'{{"{long_word}": {{"$unknown_operator": 1}}}}')
    page.locator("#search-btn").click()
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error-text")).to_contain_text(long_word)
    page.emulate_media(color_scheme="dark")
    assert_fits()
    _shot(page, "08-phone-dark-error", full_page=False)
