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
    expect(page.locator("#results-heading")).to_have_text("Collection, newest first")


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
    # The detail view fetches the image with the key (a plain link would answer 401).
    first.locator(".thumb-link").click()
    expect(page.locator("#detail")).to_be_visible()
    _wait_loaded(page, "#detail-img")
    assert (page.locator("#detail-img").get_attribute("src") or "").startswith("blob:")
    expect(page.locator("#detail-original")).to_be_hidden()
    _shot(page, "07-api-key-detail", full_page=False)
    page.keyboard.press("Escape")
    expect(page.locator("#detail")).to_be_hidden()

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


# ---------------------------------------------------------------------------------------------
# Managing a photo collection: browse, detail view, delete, filters, large uploads, messages.
# On a server of their own (small upload limit), so the counts above stay as they are.

PHOTO_LIMIT_BYTES = 60_000


def _exif_photo(seed: int, fmt: str, taken: str | None, camera: str = "Pixel 7") -> bytes:
    """A distinct photo in `fmt` whose EXIF says when (with a +02:00 offset) and with what;
    an iPhone's also says where (the Eiffel tower)."""
    import io

    from PIL import Image
    from PIL.TiffImagePlugin import IFDRational

    picture = Image.open(io.BytesIO(image_bytes(seed, "PNG", (160, 120)))).convert("RGB")
    exif = Image.Exif()
    make, _, model = camera.partition(" ")
    exif[0x010F], exif[0x0110] = ("Apple", camera) if camera.startswith("iPhone") else (make, model)
    if taken:
        exif.get_ifd(0x8769).update({0x9003: taken, 0x9011: "+02:00"})
    if camera.startswith("iPhone"):
        dms = lambda d, m, s: (IFDRational(d), IFDRational(m), IFDRational(s))  # noqa: E731
        exif.get_ifd(0x8825).update({1: "N", 2: dms(48, 51, 29.76), 3: "E", 4: dms(2, 17, 40.2)})
    out = io.BytesIO()
    picture.save(out, format=fmt, exif=exif.tobytes(), quality=90)
    return out.getvalue()


@pytest.fixture(scope="module")
def photo_server(
    chromium: Browser, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    server = ServerProcess(
        tmp_path_factory.mktemp("photo-server") / "data",
        env={"XMODAL_LIMITS__MAX_UPLOAD_BYTES": str(PHOTO_LIMIT_BYTES)},
    ).start()
    try:
        yield server
    finally:
        server.stop()


def _post_images(
    server: ServerProcess, files: list[tuple[str, bytes]], meta: Any = None
) -> list[int]:
    response = httpx.post(
        f"{server.url}/v1/images",
        files=[("files", (name, data, "application/octet-stream")) for name, data in files],
        data={"metadata": json.dumps(meta)} if meta else None,
        timeout=120,
    )
    assert response.status_code == 201, response.text
    return [int(item["id"]) for item in response.json()["items"]]


@pytest.fixture(scope="module")
def collection(photo_server: ServerProcess) -> dict[str, int]:
    """14 photos: dated ones in albums "paris" (2023) and "home" (2019), a HEIC from an iPhone
    with its GPS position, and undated ones; plus a few texts."""
    ids: dict[str, int] = {}
    paris = [
        (f"paris{i}.jpg", _exif_photo(i, "JPEG", f"2023:07:{10 + i:02d} 12:00:00"))
        for i in range(4)
    ]
    home = [
        (f"home{i}.jpg", _exif_photo(10 + i, "JPEG", f"2019:03:0{1 + i} 09:30:00"))
        for i in range(4)
    ]
    other = [(f"other{i}.png", image_bytes(40 + i)) for i in range(5)]
    for files, meta in ((paris, {"album": "paris"}), (home, {"album": "home"}), (other, None)):
        ids.update(zip([n for n, _ in files], _post_images(photo_server, files, meta), strict=True))
    heic = _exif_photo(77, "HEIF", "2023:07:14 18:03:22", camera="iPhone 13 mini")
    ids["iphone.heic"] = _post_images(photo_server, [("iphone.heic", heic)], {"album": "paris"})[0]
    texts = ["a street in paris", "a quiet garden at home", "a red umbrella", "a tower at night"]
    response = httpx.post(
        f"{photo_server.url}/v1/texts", json={"items": [{"text": t} for t in texts]}, timeout=60
    )
    assert response.status_code == 201, response.text
    return ids


def test_browse_is_newest_first_and_paged(
    open_page: Any, photo_server: ServerProcess, collection: dict[str, int]
) -> None:
    page = _open_ready(open_page, photo_server)
    page.locator("#k").select_option("12")
    expect(page.locator("#results-heading")).to_have_text("Collection, newest first")
    results = page.locator("#results .result")
    expect(results).to_have_count(12)
    newest = sorted(collection.values(), reverse=True)
    expect(results.first).to_have_attribute("data-id", str(newest[0]))
    expect(page.locator("#status")).to_have_text(
        f"12 of {len(collection)} images in the collection"
    )
    _wait_loaded(page, "#results .result:first-child img.thumb")
    _shot(page, "09-browse-newest-first")
    page.locator("#load-more").click()
    expect(results).to_have_count(len(collection))
    expect(page.locator("#load-more")).to_be_hidden()
    shown = [results.nth(i).get_attribute("data-id") for i in range(len(collection))]
    assert shown == [str(i) for i in newest]
    expect(page.locator("#status")).to_have_text(f"{len(collection)} images in the collection")


def test_detail_view_more_like_this_and_delete(
    open_page: Any, photo_server: ServerProcess, collection: dict[str, int]
) -> None:
    page = _open_ready(open_page, photo_server)
    heic_id = str(collection["iphone.heic"])
    result = page.locator(f'#results .result[data-id="{heic_id}"]')
    result.locator(".thumb-link").click()
    detail = page.locator("#detail")
    expect(detail).to_be_visible()
    expect(page.locator("#detail-title")).to_have_text("iphone.heic")
    meta = page.locator("#detail-meta")
    expect(meta).to_contain_text("taken2023-07-14 18:03:22+02:00")
    expect(meta).to_contain_text("cameraApple iPhone 13 mini")
    expect(meta).to_contain_text("position48.85827, 2.29450")
    expect(meta).to_contain_text("albumparis")
    expect(meta).to_contain_text("image/heic")
    # Browsers cannot show HEIC: the thumbnail stands in, and the page says so.
    expect(page.locator("#detail-note")).to_contain_text("image/heic")
    _wait_loaded(page, "#detail-img")
    assert (page.locator("#detail-img").get_attribute("src") or "").endswith("/thumbnail")
    expect(page.locator("#detail-texts li")).to_have_count(4)
    _shot(page, "10-detail-heic", full_page=False)
    page.keyboard.press("Escape")
    expect(detail).to_be_hidden()

    # A JPEG opens large, as the original; "More like this" searches with it.
    jpeg_id = str(collection["paris2.jpg"])
    page.locator(f'#results .result[data-id="{jpeg_id}"] .thumb-link').click()
    expect(page.locator("#detail-title")).to_have_text("paris2.jpg")
    _wait_loaded(page, "#detail-img")
    assert (page.locator("#detail-img").get_attribute("src") or "").endswith("/content")
    expect(page.locator("#detail-note")).to_be_hidden()
    page.locator("#detail-more").click()
    expect(detail).to_be_hidden()
    expect(page.locator("#results-heading")).to_have_text("Images like paris2.jpg")
    expect(page.locator("#results .result").first).to_have_attribute("data-id", jpeg_id)

    # Delete asks first; "Keep it" keeps it, "Delete image" deletes it everywhere.
    page.locator("#results .result").first.locator(".thumb-link").click()
    expect(page.locator("#detail-title")).to_have_text("paris2.jpg")
    page.locator("#detail-delete").click()
    expect(page.locator("#detail-confirm")).to_be_visible()
    expect(page.locator("#detail-confirm-no")).to_be_focused()
    _shot(page, "11-detail-delete-confirm", full_page=False)
    page.locator("#detail-confirm-no").click()
    expect(page.locator("#detail-confirm")).to_be_hidden()
    assert httpx.get(f"{photo_server.url}/v1/images/{jpeg_id}").status_code == 200
    page.locator("#detail-delete").click()
    page.locator("#detail-confirm-yes").click()
    expect(detail).to_be_hidden()
    expect(page.locator(f'#results .result[data-id="{jpeg_id}"]')).to_have_count(0)
    expect(page.locator("#status")).to_have_text("Deleted paris2.jpg.")
    expect(page.locator("#info")).to_contain_text(f"{len(collection) - 1} images")
    assert httpx.get(f"{photo_server.url}/v1/images/{jpeg_id}").status_code == 404
    del collection["paris2.jpg"]


def test_date_range_and_album_filters(
    open_page: Any, photo_server: ServerProcess, collection: dict[str, int]
) -> None:
    page = _open_ready(open_page, photo_server)

    def names() -> list[str]:
        return sorted(page.locator("#results .result .filename").all_inner_texts())

    page.locator("#taken-from").fill("2023-01-01")
    page.locator("#taken-to").fill("2023-12-31")
    _text_search(page, "a photo")
    paris = sorted(n for n in collection if n.startswith("paris") or n == "iphone.heic")
    expect(page.locator("#results .result")).to_have_count(len(paris))
    assert names() == paris
    page.locator("#taken-from").fill("")
    page.locator("#taken-to").fill("2019-03-02")
    page.locator("#taken-to").dispatch_event("change")
    expect(page.locator("#results .result")).to_have_count(2)
    assert names() == ["home0.jpg", "home1.jpg"]
    page.locator("#taken-to").fill("")
    page.locator("#album").fill("home")
    page.locator("#album").dispatch_event("change")
    expect(page.locator("#results .result")).to_have_count(4)
    assert names() == [f"home{i}.jpg" for i in range(4)]
    _wait_loaded(page, "#results .result:first-child img.thumb")
    _shot(page, "12-filters-album")


def test_large_batch_upload_progress_and_errors(
    open_page: Any, photo_server: ServerProcess, collection: dict[str, int]
) -> None:
    page = _open_ready(open_page, photo_server)
    files = [
        {"name": f"batch{i:02d}.png", "mimeType": "image/png", "buffer": image_bytes(100 + i)}
        for i in range(36)
    ]
    files[5] = {"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image at all"}
    files[20] = {
        "name": "cut.heic",
        "mimeType": "image/heic",
        "buffer": _exif_photo(5, "HEIF", None)[:200],
    }
    page.locator("#upload-input").set_input_files(files)  # type: ignore[arg-type]
    # The page stays usable while the batch uploads: a search answers meanwhile.
    _text_search(page, "during the upload")
    expect(page.locator("#results .result").first).to_be_visible()
    summary = page.locator("#upload-summary")
    expect(summary).to_have_text("36 files: 34 indexed, 2 failed")
    expect(page.locator("#upload-progress")).to_have_attribute("value", "36")
    failures = page.locator("#upload-failures li")
    expect(failures).to_have_count(2)
    expect(failures.nth(0)).to_contain_text("notes.png")
    expect(failures.nth(1)).to_contain_text("cut.heic")
    expect(page.locator("#upload-failures")).to_contain_text("not an image in a supported format")
    expect(page.locator("#upload-failures")).to_contain_text("truncated or damaged")
    expect(page.locator("#info")).to_contain_text(f"{len(collection) + 34} images")
    page.locator("#upload-heading").scroll_into_view_if_needed()
    _shot(page, "13-upload-batch", full_page=False)


def test_clear_messages_for_413_415_503(
    open_page: Any, photo_server: ServerProcess, collection: dict[str, int]
) -> None:
    page = _open_ready(open_page, photo_server)
    # 413: a file over the server's limit (known from /v1/info) is refused without sending it.
    big = image_bytes(3, "PNG", (400, 400)) + b"\0" * PHOTO_LIMIT_BYTES
    page.locator("#upload-input").set_input_files(
        [{"name": "huge.png", "mimeType": "image/png", "buffer": big}]
    )
    expect(page.locator("#upload-failures li")).to_have_text(
        re.compile(r"huge\.png: too large \(\d+ KB; the limit is 59 KB\)")
    )
    # 413 from the server itself (a proxy's smaller limit, say): its meaning is shown.
    page.route(
        "**/v1/images",
        lambda route: (
            route.fulfill(status=413, body="", content_type="text/plain")
            if route.request.method == "POST"
            else route.continue_()
        ),
    )
    page.locator("#upload-input").set_input_files(
        [{"name": "small.png", "mimeType": "image/png", "buffer": image_bytes(4)}]
    )
    expect(page.locator("#upload-failures li")).to_have_text(
        "small.png: Too large: the server refused a file or request of this size."
    )
    page.unroute("**/v1/images")
    # 415: the server's own words.
    page.locator("#upload-input").set_input_files(
        [{"name": "words.png", "mimeType": "image/png", "buffer": b"words, words"}]
    )
    expect(page.locator("#upload-failures li")).to_contain_text(
        "words.png: not an image in a supported format (JPEG, PNG, GIF, WebP, BMP, TIFF, AVIF"
    )
    # 503 with Retry-After: busy, and when to try again.
    body = json.dumps({"error": {"code": "overloaded", "message": "The server is overloaded."}})
    page.route(
        "**/v1/search/text",
        lambda route: route.fulfill(
            status=503, body=body, content_type="application/json", headers={"Retry-After": "7"}
        ),
    )
    page.locator("#query").fill("busy")
    page.locator("#query").press("Enter")
    expect(page.locator("#error-text")).to_have_text("The server is overloaded. Try again in 7 s.")
    page.locator("#upload-heading").scroll_into_view_if_needed()
    _shot(page, "14-messages", full_page=True)
    # (401 is the API-key prompt: test_api_key_asked_once and test_api_key_rejected_then_accepted)
