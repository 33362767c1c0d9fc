"""The dashboard in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium) against a running federation: a root with the
dashboard and a token, a leaf, and two ``Island`` daemons training a tiny bytelm in threads.

The page is opened the way an operator opens it (``/dashboard?token=...``, then the cookie);
it must load without console errors, list both islands (which only the leaf saw: the root
knows them from the leaf's summaries) and the leaf under the root, and show the global
version moving as training advances. A screenshot is written (``dashboard.png`` in the
test's temporary directory, or where ``ARCHIPELAGO_DASHBOARD_PNG`` says). Skips, saying why,
only where no Chromium, chromedriver or Selenium can be found (``make test`` installs them
where apt is available)."""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest

from aggregator.config import AggregatorConfig, MergeConfig, ModelConfig
from aggregator.service import AggregatorService
from comms.aio import LoopThread
from comms.identity import Identity, Roster
from island.config import IslandConfig
from island.daemon import Island, export_initial_parameters
from island.sync import SyncConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

TOKEN = "browser-t0ken"
TINY = {"d_model": 32, "n_layer": 1, "n_head": 2, "context": 32, "batch_size": 4}


def _chromium() -> tuple[str, str]:
    """(browser, driver) paths, or a skip that says what is missing."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    browser = next(
        filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
    )
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip(
            "no Chromium and chromedriver found: apt-get install chromium chromium-driver "
            "(make test does it where apt is available)"
        )
    return browser, driver


def _browser(browser: str, driver: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1500,1900", "--hide-scrollbars"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def _island_config(tmp_path, i: int) -> IslandConfig:
    return IslandConfig(
        name=f"island{i}", key=str(tmp_path / f"island{i}.pem"),
        roster=str(tmp_path / "roster.json"), workload="bytelm", workload_config=TINY,
        steps=0, shard=i, num_shards=2, threads=1, eval_batches=1, http="",
        slowdown=2.0, sync=SyncConfig(model_id="global", every=4, codec="int8"),
    )  # fmt: skip


def _federation(tmp_path) -> tuple[AggregatorConfig, AggregatorConfig, list[IslandConfig]]:
    roster = Roster()
    for name, role in (("island0", "island"), ("island1", "island"), ("root", "aggregator"),
                       ("leaf0", "aggregator")):  # fmt: skip
        ident = Identity.generate()
        ident.save(tmp_path / f"{name}.pem")
        roster.add(ident.public_key, role, name)
    roster.save(tmp_path / "roster.json")
    islands = [_island_config(tmp_path, i) for i in range(2)]
    export_initial_parameters(islands[0], str(tmp_path / "init.safetensors"))

    def aggregator(name, role, k, **kw):
        return AggregatorConfig(
            name=name, role=role, key=str(tmp_path / f"{name}.pem"),
            roster=str(tmp_path / "roster.json"), state_dir=str(tmp_path / f"{name}-state"),
            merge=MergeConfig(buffer_k=k, deadline_s=2.0), **kw,
        )  # fmt: skip

    root = aggregator(
        "root", "root", 1, http="127.0.0.1:0", http_token=TOKEN,
        models=[ModelConfig("global", init=str(tmp_path / "init.safetensors"), codec="int8")],
    )  # fmt: skip
    leaf = aggregator("leaf0", "leaf", 2, http="", models=[ModelConfig("global")],
                      summary_interval_s=0.5)  # fmt: skip
    return root, leaf, islands


def test_the_dashboard_in_headless_chromium_follows_a_training_federation(tmp_path):
    browser_path, driver_path = _chromium()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    root_cfg, leaf_cfg, island_cfgs = _federation(tmp_path)
    with LoopThread("aggregators") as loop:
        root = AggregatorService(root_cfg)
        leaf_cfg.parent = loop.run(root.start(), 30)
        leaf = AggregatorService(leaf_cfg)
        address = loop.run(leaf.start(), 30)
        islands = []
        for cfg in island_cfgs:
            cfg.aggregator = address
            islands.append(Island(cfg))
        threads = [threading.Thread(target=i.run, daemon=True) for i in islands]
        driver = None
        try:
            for t in threads:
                t.start()
            driver = _browser(browser_path, driver_path)
            driver.get(f"http://{root.http_address}/dashboard?token={TOKEN}")
            assert driver.current_url == f"http://{root.http_address}/dashboard"  # no token

            def table_text(table_id: str) -> str:
                return driver.find_element(By.ID, table_id).text

            wait = WebDriverWait(driver, 40, poll_frequency=0.2)
            wait.until(lambda d: "island0" in table_text("islands"))
            wait.until(lambda d: "island1" in table_text("islands"))
            assert "leaf0" in table_text("aggregators") and "root" in table_text("aggregators")
            assert "global model" in table_text("models")  # every model line, by kind
            assert not driver.find_element(By.ID, "router-section").is_displayed()  # none set
            first = int(driver.find_element(By.ID, "version").text)
            wait.until(lambda d: int(d.find_element(By.ID, "version").text) > first)
            wait.until(lambda d: d.find_element(By.ID, "alive").text == "2 / 2")
            wait.until(lambda d: d.find_element(By.ID, "val").text not in ("", "–"))
            assert "live" in driver.find_element(By.ID, "link").get_attribute("class")
            shot = os.environ.get("ARCHIPELAGO_DASHBOARD_PNG") or str(tmp_path / "dashboard.png")
            time.sleep(1.2)  # one more event, so the charts hold a few points
            assert driver.save_screenshot(shot)
            assert os.path.getsize(shot) > 10_000
            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert errors == [], errors
        finally:
            if driver is not None:
                driver.quit()
            for island in islands:
                island.stop()
            for t in threads:
                t.join(30)
            loop.run(leaf.stop(), 10)
            loop.run(root.stop(), 10)
