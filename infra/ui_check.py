"""Check in a real headless browser that a completed run's page in the Prefect UI shows the
allocation table and the evaluation summary, and save screenshots.

    python infra/ui_check.py --out ui-check/      # needs Chromium + chromedriver (Debian: chromium chromium-driver)
                                                  # and selenium (pip install "expertbits[ui]")

It brings the local set up (`expertbits dev up` in a temporary folder), runs the `quantize`
deployment on the bundled micro model as the UI's Run button does, opens the finished flow run
in Chromium, then each of its artifacts, asserts what a user must see, saves a screenshot of each
page, and takes the set down again.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

FORM = {"checkpoint": "zoo://micro-mixtral/finetuned", "reference": "zoo://micro-mixtral/base", "avg_bits": 2.5,
        "bit_widths": [2, 3], "group_size": 32, "eval_windows": 2, "calibration_windows": 2, "eval_seq_len": 64}


def browser(binary: str | None):
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1100"):
        options.add_argument(flag)
    if binary:
        options.binary_location = binary
    service = webdriver.ChromeService(executable_path="/usr/bin/chromedriver") if Path("/usr/bin/chromedriver").exists() \
        else webdriver.ChromeService()
    return webdriver.Chrome(options=options, service=service)


def wait_for_text(driver, needles: list[str], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = driver.find_element("tag name", "body").text
        if all(n in text for n in needles):
            return text
        time.sleep(1)
    raise AssertionError(f"not on the page after {timeout:.0f} s: {[n for n in needles if n not in text]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("ui-check"), help="folder for the screenshots")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium binary")
    parser.add_argument("--port", type=int, default=4260)
    parser.add_argument("--s3-port", type=int, default=9160)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import httpx
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from expertbits.flows import dev

    folder = Path(tempfile.mkdtemp(prefix="expertbits-ui-"))
    state = dev.up(folder, args.port, args.s3_port)
    report = {"ui": state["ui"]}
    try:
        with temporary_settings({PREFECT_API_URL: state["api"]}), get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("expertbits-quantize/quantize")
            run = client.create_flow_run_from_deployment(deployment.id, parameters={"params": dict(FORM, store=str(folder / "store"))})
            deadline = time.monotonic() + 300
            while not (state_ := client.read_flow_run(run.id).state) or not state_.is_final():
                if time.monotonic() > deadline:
                    raise AssertionError("the run did not finish within 300 s")
                time.sleep(1)
            assert state_.is_completed(), state_
            artifacts = httpx.post(f"{state['api']}/artifacts/filter", timeout=10,
                                   json={"artifacts": {"flow_run_id": {"any_": [str(run.id)]}}}).json()
        table = next(a for a in artifacts if a["type"] == "table" and (a["key"] or "").startswith("bit-allocation-"))
        summary = next(a for a in artifacts if a["type"] == "markdown" and (a["key"] or "").startswith("quant-eval-"))

        driver = browser(args.chromium)
        try:
            pages = {
                "run": (f"{state['ui']}/runs/flow-run/{run.id}", [run.name, "Completed"]),
                "allocation-table": (f"{state['ui']}/artifacts/artifact/{table['id']}", ["layer", "expert", "bits", "reason"]),
                "evaluation-summary": (f"{state['ui']}/artifacts/artifact/{summary['id']}",
                                       ["KL(fp ‖ quant) per token", "perplexity fp / quant", "kernel check"]),
            }
            for name, (url, needles) in pages.items():
                driver.get(url)
                text = wait_for_text(driver, needles)
                driver.save_screenshot(str(args.out / f"{name}.png"))
                report[name] = {"url": url, "found": needles, "chars": len(text)}
        finally:
            driver.quit()
    finally:
        dev.down(folder)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
