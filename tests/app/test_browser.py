"""A real headless Chromium (Debian's ``chromium`` + ``chromium-driver``) drives the app through Selenium.

It enters a prompt, switches on attention maps (and Attend-and-Excite and a region, once those controls are
registered), generates on ``shapes``, checks that an image and its attention map appear, and saves a
screenshot to ``$ATTNCTL_ARTIFACTS`` (default ``out/browser``). Without Chromium the test skips, unless
``ATTNCTL_REQUIRE_BROWSER=1`` (CI sets it after installing the packages), where a missing browser fails.
"""

import os
import shutil
from pathlib import Path

import pytest

from attnctl.controls import CONTROLS, control_class

pytestmark = pytest.mark.browser

PROMPT = "a red circle and a blue square"
ARTIFACTS = Path(os.environ.get("ATTNCTL_ARTIFACTS", Path(__file__).resolve().parents[2] / "out" / "browser"))


def _binaries():
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    return browser, shutil.which("chromedriver")


@pytest.fixture(scope="module")
def driver():
    browser, chromedriver = _binaries()
    if not (browser and chromedriver):
        message = "needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)"
        if os.environ.get("ATTNCTL_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 "--window-size=1400,1100"):
        options.add_argument(flag)
    drv = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()


def test_generate_with_maps_in_a_real_browser(served, driver):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 60)

    def css(selector):
        return wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, selector)))

    def click(selector):
        element = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, selector)))
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
        element.click()

    def type_into(elem_id, text):
        box = css(f"#{elem_id} textarea, #{elem_id} input")
        box.clear()
        box.send_keys(text)

    def tab(name):
        button = wait.until(ec.element_to_be_clickable(
            (By.XPATH, f"//button[@role='tab' and normalize-space()='{name}']")))
        button.click()

    driver.get(served)
    type_into("prompt", PROMPT)
    type_into("steps", "6")  # a slider's number box
    tab("Attention maps")
    click("#maps-enabled input[type=checkbox]")
    type_into("maps-words", "circle, square")
    if "excite" in CONTROLS:
        words = next(f for f in _fields("excite") if f.key == "subjects")
        tab("Generate")
        click("#panel-excite button, #panel-excite .label-wrap")
        click("#excite-enabled input[type=checkbox]")
        type_into(f"excite-{words.key}", "[circle, square]" if words.kind == "yaml" else "circle, square")
    if "regions" in CONTROLS:
        tab("Regions")
        click("#regions-enabled input[type=checkbox]")
        type_into("regions-boxes", "red circle: 0, 0, 0.5, 0.5\nblue square: 0.5, 0.5, 1, 1")
    click("#generate")
    image = css("#images img")
    overlay = css("#maps img")
    wait.until(lambda d: "image" in d.find_element(By.CSS_SELECTOR, "#summary").text)
    assert image.get_attribute("src") and overlay.get_attribute("src")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#maps img")) >= 2  # one overlay per word
    summary = " ".join(driver.find_element(By.CSS_SELECTOR, "#summary").text.split())
    assert "1 image on shapes" in summary and "maps" in summary
    for name in ("excite", "regions"):
        if name in CONTROLS:
            assert name in summary
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(ARTIFACTS / "app.png"))


def test_a_bad_word_shows_the_error_in_the_page(served, driver):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(served)
    wait = WebDriverWait(driver, 60)
    box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
    box.send_keys("a red circle")
    driver.find_element(By.XPATH, "//button[@role='tab' and normalize-space()='Attention maps']").click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#maps-enabled input[type=checkbox]")).click()
    driver.find_element(By.CSS_SELECTOR, "#maps-words textarea, #maps-words input").send_keys("dog")
    driver.find_element(By.CSS_SELECTOR, "#generate").click()
    wait.until(lambda d: "'dog' is not in the prompt" in d.find_element(By.TAG_NAME, "body").text)


def _fields(name):
    from attnctl.app.forms import fields_of

    return fields_of(control_class(name).Options)
