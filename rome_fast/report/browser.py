"""Opening a report in headless Chromium (a system browser driven by Playwright), for the tests and
the scale benchmark: launch flags that work offline and as root, page load with console capture,
and the page's own timings. Needs `pip install playwright` and a Chromium (Debian: `apt-get install
chromium`); `playwright install` (which downloads a browser) is not needed."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

# No sandbox (root in a container), no GPU, and no background connections: a closed network would
# refuse them and fill the log. Playwright adds --headless and a fresh temporary --user-data-dir.
CHROMIUM_FLAGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """$ROME_FAST_CHROMIUM, else the first Chromium on PATH."""
    env = os.environ.get("ROME_FAST_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


@contextmanager
def chromium(executable: str | None = None):
    """A headless Chromium browser (Playwright's sync API), closed on exit."""
    from playwright.sync_api import sync_playwright

    exe = executable or find_chromium()
    if exe is None:
        raise FileNotFoundError("no Chromium found: apt-get install chromium, or set ROME_FAST_CHROMIUM")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=list(CHROMIUM_FLAGS))
        try:
            yield browser
        finally:
            browser.close()


class OpenedReport:
    """A report loaded in a page, with what the page said: console messages, uncaught errors,
    dialogs (an injected alert() would show here) and every URL it requested."""

    def __init__(self, browser, path, viewport=(1400, 1000), timeout_ms: int = 60000, init_script: str = ""):
        self.messages: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.requests: list[str] = []
        self.page = browser.new_page(viewport=dict(width=viewport[0], height=viewport[1]))
        self.page.on("console", lambda m: self.messages.append((m.type, m.text)))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", self._dialog)
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.cdp = self.page.context.new_cdp_session(self.page)
        self.cdp.send("Performance.enable")  # CPU time, see cpu_ms()
        if init_script:  # runs in the page before any of its own scripts
            self.page.add_init_script(init_script)
        self.page.goto(Path(path).resolve().as_uri())
        self.page.wait_for_function("window.rfReport && window.rfReport.ready", timeout=timeout_ms)

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    @property
    def console_errors(self) -> list[str]:
        return [t for kind, t in self.messages if kind == "error"] + self.errors + \
            list(self.page.evaluate("window.rfReport.errors"))

    def timings(self) -> dict:
        """Milliseconds from navigation start: the page's own marks (script start, table
        rendered, first and all figures drawn) and the browser's first contentful paint,
        DOMContentLoaded and load."""
        return self.page.evaluate("""() => {
            const nav = performance.getEntriesByType('navigation')[0];
            const fcp = performance.getEntriesByName('first-contentful-paint')[0];
            return Object.assign({firstContentfulPaint: fcp ? fcp.startTime : null,
                                  domContentLoaded: nav.domContentLoadedEventEnd, load: nav.loadEventEnd},
                                 window.rfReport.timings);
        }""")

    def cpu_ms(self) -> dict:
        """CPU milliseconds the page has used so far: its main thread and its renderer process.
        Unlike the timings (wall clock), these hardly grow when other processes compete for the
        CPU: they tell what a load on an idle machine would take."""
        m = {x["name"]: x["value"] for x in self.cdp.send("Performance.getMetrics")["metrics"]}
        return {"main_thread_cpu_ms": 1000 * m["ThreadTime"], "renderer_cpu_ms": 1000 * m["ProcessTime"]}

    def close(self) -> None:
        self.page.close()
