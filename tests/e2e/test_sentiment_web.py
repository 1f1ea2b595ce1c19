"""The review web page (examples/sentiment/web.py) on a model trained on the repository's real reviews: its JSON API
and errors over real HTTP, batching of concurrent requests, and a real headless Chromium (Debian's `chromium` and
`chromium-driver`, driven by selenium through /usr/bin/chromedriver) that types a review, clicks "Classify", reads
the verdict and saves a screenshot.

Chromium missing: the browser test skips with the reason, except in CI ($CI=true), where it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from examples.sentiment import data, train
from examples.sentiment.infer import Classifier

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REVIEW = "A moving, beautifully acted film with a wonderful story. I loved it and would watch it again!"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CNN trained for 2 epochs on 1,000 real reviews of the sample (a few seconds)."""
    out = tmp_path_factory.mktemp("model")
    args = ["--data", str(data.SAMPLE), "--limit", "1000", "--epochs", "2", "--bigram-buckets", "0", "--embed-dim",
            "32", "--filters", "32", "--out", str(out), "--no-cache", "--no-progress"]  # fmt: skip
    rc = train.main(args)
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """web.py in its own process on a free port (--max-bytes 4096 to reach 413 cheaply); yields the base URL."""
    log = tmp_path_factory.mktemp("web") / "web.log"
    with log.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "examples/sentiment/web.py", "--model", str(model_dir), "--port", "0",
                                 "--max-bytes", "4096"], cwd=REPO, stdout=f, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        url = None
        for _ in range(600):
            m = re.search(r"serving on (http://\S+/)", log.read_text())
            if m:
                url = m.group(1)
                break
            assert proc.poll() is None, log.read_text()
            threading.Event().wait(0.1)
        assert url, log.read_text()
        yield url.rstrip("/")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _post(url: str, body: bytes, ctype: str = "application/json") -> tuple[int, dict | str]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    text = raw.decode()
    return status, json.loads(text) if text.startswith("{") else text


def test_api_classifies_and_names_model_and_device(server: str) -> None:
    status, body = _post(f"{server}/api/classify", json.dumps({"text": REVIEW}).encode())
    assert status == 200 and isinstance(body, dict), body
    (result,) = body["results"]
    assert result["label"] in ("pos", "neg") and 0.0 <= result["p_pos"] <= 1.0
    assert body["device"] == "cpu" and "SentimentCNN" in body["model"]
    status, body = _post(f"{server}/api/classify", json.dumps({"texts": ["great", "awful", "fine"]}).encode())
    assert status == 200 and isinstance(body, dict) and len(body["results"]) == 3


@pytest.mark.parametrize(
    ("body", "ctype", "status", "message"),
    [
        (b'{"text": "   "}', "application/json", 400, "empty"),
        (b'{"text": "caf\xe9 bad"}', "application/json", 400, "UTF-8"),
        (b"not json", "application/json", 400, "not JSON"),
        (b'{"texts": []}', "application/json", 400, "texts"),
        (b'{"text": 5}', "application/json", 400, "string"),
        (json.dumps({"text": "long " * 2000}).encode(), "application/json", 413, "too long"),
        (b"text=", "application/x-www-form-urlencoded", 400, "empty"),
        (b"text=caf%E9", "application/x-www-form-urlencoded", 400, "UTF-8"),
        (b"text=" + b"a" * 5000, "application/x-www-form-urlencoded", 413, "too long"),
    ],
)
def test_bad_input_gets_a_clear_error(server: str, body: bytes, ctype: str, status: int, message: str) -> None:
    path = "/api/classify" if ctype == "application/json" else "/"
    got, answer = _post(f"{server}{path}", body, ctype)
    assert got == status, answer
    assert message in (answer["error"] if isinstance(answer, dict) else answer)


def test_concurrent_requests_are_batched(model_dir: Path) -> None:
    from examples.sentiment.web import Batcher  # (here: Flask imported by this test, not by every worker's collection)

    batcher = Batcher(Classifier.load(model_dir, "cpu"), max_batch=64, window_s=0.5)
    results: list[str] = []
    threads = [threading.Thread(target=lambda i=i: results.append(batcher.classify([f"review {i} good"])[0].label))
               for i in range(8)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 8 and sum(batcher.batches) == 8
    assert max(batcher.batches) > 1, batcher.batches  # 8 requests within the window: not 8 forward passes


def _browser(profile: Path) -> Any:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (Path(p).exists() or shutil.which(Path(p).name))]
    if missing:
        reason = f"{', '.join(missing)} not installed (apt-get install chromium chromium-driver; scripts/setup.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}: CI must run the browser test")
        pytest.skip(reason)
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1000,800", f"--user-data-dir={profile}"):  # fmt: skip
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def test_a_person_types_a_review_clicks_and_reads_the_verdict(server: str, tmp_path: Path) -> None:
    profile = tmp_path / "chromium-profile"  # a fresh profile per run
    driver = _browser(profile)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        driver.get(server + "/")
        about = driver.find_element(By.ID, "about").text
        assert "SentimentCNN" in about and "cpu" in about
        driver.find_element(By.ID, "text").send_keys(REVIEW)
        driver.find_element(By.ID, "classify").click()
        verdict = WebDriverWait(driver, 60).until(ec.presence_of_element_located((By.ID, "verdict")))
        assert re.fullmatch(r"(Positive|Negative) \(\d+\.\d% sure\)", verdict.text), verdict.text
        assert verdict.get_attribute("data-label") in ("pos", "neg")
        assert driver.find_element(By.ID, "text").get_attribute("value") == REVIEW
        shot = Path(os.environ.get("GPUPOOL_TEST_ARTIFACTS", tmp_path)) / "sentiment-web.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
        # an empty review: the page says so instead of a verdict
        driver.find_element(By.ID, "text").clear()
        driver.find_element(By.ID, "classify").click()
        error = WebDriverWait(driver, 60).until(ec.presence_of_element_located((By.ID, "error")))
        assert "empty" in error.text
    finally:
        driver.quit()
