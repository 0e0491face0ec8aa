"""The debugging page in a real headless Chromium (Debian's chromium and chromium-driver)."""
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
                     "--disable-quic", "--window-size=1400,900", f"--user-data-dir={tmp_path / 'chromium'}"):
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
