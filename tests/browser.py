"""Open a local HTML file in a real headless Chromium (Playwright) and report what happened.

The browser is the system's ``chromium`` (Debian's package), never one that Playwright
downloads (``playwright install``): tests stay offline. The page is opened with network
requests refused, so a report that tried to fetch anything would show it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from limits import BROWSER_STEP

#: Playwright's timeouts are in milliseconds; every step gets the guard of limits.py.
STEP_MS = BROWSER_STEP * 1000


def find_chromium() -> str | None:
    """The system Chromium's path, or None (with playwright importable)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return None
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class PageCheck:
    """What a page did when opened."""

    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)  # alert()/confirm() messages: none expected
    requests: list[str] = field(default_factory=list)  # URLs other than the file itself
    images: list[dict[str, object]] = field(default_factory=list)  # alt, naturalWidth, complete
    text: str = ""  # the page's visible text (document.body.innerText)
    #: the class of each table wider than the box it sits in (cut off, or scrolled)
    too_wide: list[str] = field(default_factory=list)
    screenshot: Path | None = None


def open_page(html: Path, screenshot: Path, *, executable: str,
              width: int = 1280) -> PageCheck:
    """Load ``html`` in headless Chromium, wait for it, and take a full-page screenshot."""
    from playwright.sync_api import sync_playwright

    check = PageCheck(screenshot=screenshot)
    url = html.resolve().as_uri()
    with sync_playwright() as p:
        # --no-sandbox: tests may run as root (CI containers), where Chromium's sandbox
        # refuses to start.
        browser = p.chromium.launch(executable_path=executable, headless=True,
                                    args=["--no-sandbox", "--disable-gpu"],
                                    timeout=STEP_MS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.set_default_timeout(STEP_MS)  # goto, screenshot, inner_text, evaluate
            page.on("console", lambda m: check.console_errors.append(m.text)
                    if m.type == "error" else None)
            page.on("pageerror", lambda e: check.page_errors.append(str(e)))

            def on_dialog(dialog: object) -> None:
                check.dialogs.append(dialog.message)  # type: ignore[attr-defined]
                dialog.dismiss()  # type: ignore[attr-defined]

            page.on("dialog", on_dialog)

            def on_request(route: object) -> None:
                request = route.request  # type: ignore[attr-defined]
                if request.url == url or request.url.startswith("data:"):
                    route.continue_()  # type: ignore[attr-defined]
                else:
                    check.requests.append(request.url)
                    route.abort()  # type: ignore[attr-defined]

            page.route("**/*", on_request)
            page.goto(url, wait_until="load")
            page.wait_for_function(
                "Array.from(document.images).every(i => i.complete)", timeout=STEP_MS)
            check.images = page.evaluate(
                "Array.from(document.images).map(i => ({alt: i.alt, "
                "naturalWidth: i.naturalWidth, complete: i.complete}))")
            check.text = page.inner_text("body")
            check.too_wide = page.evaluate(
                "Array.from(document.querySelectorAll('table')).filter(t => "
                "t.offsetWidth > t.parentElement.clientWidth + 1).map(t => t.className)")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return check


def screenshot_stats(path: Path) -> tuple[int, float]:
    """(distinct colours, share of non-white pixels) of a screenshot."""
    from PIL import Image

    with Image.open(path) as image:
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 24) or []
        pixels = rgb.width * rgb.height
        white = sum(n for n, c in colours if isinstance(c, tuple) and min(c) >= 250)
    return len(colours), 1 - white / pixels
