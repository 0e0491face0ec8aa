"""The debugging page in a real headless Chromium (Debian's chromium and chromium-driver)."""
import re
import shutil

import pytest

from tests.network import Network

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# What the page's own script shows; the figures' statements run on both engines in test_debug_page.py.
pytestmark = pytest.mark.one_engine


@pytest.fixture
def browser(tmp_path):
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail("Debian's chromium and chromium-driver are missing: run tests/install-tools.sh (make test does)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-quic", "--window-size=1280,900", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def network(tmp_path, pki):
    network = Network(tmp_path / "kmes", pki, [(1, 2)])
    network.write_link_file(1, 2, "link.cor", 100)
    network.start_all()
    network[1].start("debug")
    network.wait_for_link(1, 2, 100)
    yield network
    network.stop_all()


def text_of(driver, selector: str) -> str:
    """Read an element's text in one script call: the page replaces its rows twice a second."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent : '';",
                                 selector)


def available_on_link_2(driver) -> str:
    return text_of(driver, "tr[data-link='2'] td.available")


def test_events_and_pool_figures_appear_live(browser, network, tmp_path):
    kme1 = network[1]
    browser.get(kme1.debug_url())
    # KME 1 arbitrates the link: all 100 keys are its direction's until it lends some.
    WebDriverWait(browser, 10).until(lambda d: available_on_link_2(d) == "100")
    assert "Ingested key file link.cor" in text_of(browser, "#events")

    keys = kme1.sae(1).get(f"{kme1.url()}/keys/3/enc_keys?number=3", timeout=10).json()["keys"]
    # Live: no reload, the page's own refresh must show the change within 2 s.
    WebDriverWait(browser, 2, poll_frequency=0.1).until(
        lambda d: f"Key {keys[-1]['key_ID']} activated between SAEs 1 and 3" in text_of(d, "#events"))
    WebDriverWait(browser, 2, poll_frequency=0.1).until(lambda d: available_on_link_2(d) == "97")
    outbound = "tr[data-direction='1-2']"
    assert text_of(browser, outbound + " td.available") == "97"
    assert browser.execute_script(f"return document.querySelectorAll(\"{outbound} svg.chart polyline\").length") == 1
    row = text_of(browser, "tr[data-link='2']")
    assert "link.cor" in row and "reachable" in row
    events = text_of(browser, "#events")
    assert "[Test1] " in events and keys[0]["key"] not in browser.page_source
    browser.save_screenshot(str(tmp_path / "debug-page.png"))
    assert (tmp_path / "debug-page.png").stat().st_size > 10_000


def fits_its_window(driver) -> bool:
    return driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")


def test_the_page_fits_1280_pixels_and_its_charts_have_axes_and_a_collecting_state(browser, network):
    kme1 = network[1]
    # A long key file name, shown in the pools table, must wrap rather than widen the page.
    network.write_link_file(1, 2, "qkd-link-paris-lyon-" + "0123456789" * 8 + ".cor", 10)
    network.wait_for_link(1, 2, 110)
    browser.get(kme1.debug_url())
    WebDriverWait(browser, 10).until(lambda d: available_on_link_2(d) == "110")
    assert browser.execute_script("return window.innerWidth") <= 1280
    assert fits_its_window(browser), browser.execute_script("return document.documentElement.scrollWidth")
    chart = "tr[data-direction='1-2'] svg.chart"
    WebDriverWait(browser, 10).until(lambda d: "now" in text_of(d, chart) and "collecting" not in text_of(d, chart))
    labels = text_of(browser, chart)
    # The y axis runs from 0 to the highest sample (the samples are a minute apart: maybe taken before ingestion).
    assert "−60 min" in labels and "now" in labels and re.search(r"\d+ keys?", labels) and "0" in labels
    assert browser.execute_script(f"return document.querySelectorAll(\"{chart} line.axis\").length") == 2

    # No sample yet (a new link, or the samples gone): the chart says it is collecting, with its axes.
    kme1.stop("ingest")
    kme1.ledger.write(("DELETE FROM pool_levels",))
    WebDriverWait(browser, 10).until(lambda d: "collecting" in text_of(d, chart))
    assert "key" not in text_of(browser, chart)
    assert browser.execute_script(f"return document.querySelectorAll(\"{chart} polyline\").length") == 0
    assert fits_its_window(browser)
