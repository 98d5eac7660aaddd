"""The web UI served for real on localhost and driven through gradio's HTTP API (gradio_client): a
generation on the tiny tree, a script's error shown as the page's error, a LoRA conversion."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import av
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network in tests
pytest.importorskip("gradio", reason="the web UI needs gradio (pip install -e '.[gui]')")

import kandinsky5_gui  # noqa: E402

from .test_acceptance_docs import write_lora  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_tree, tmp_path_factory):
    from gradio_client import Client

    output = tmp_path_factory.mktemp("gui_outputs")
    app = kandinsky5_gui.build_app(kandinsky5_gui.tiny_defaults(tiny_tree), output)
    app.queue().launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield Client(app.local_url, verbose=False), output
    app.close()


def form(tree, **changes):
    values = dict(
        task="tiny-t2v", prompt="a red fox in the snow", negative_prompt="", image="", loras="", width=64, height=64,
        frames=9, steps=2, guidance=None, seed=7, fp8=False, blocks_to_swap=0,
        dit=str(tree / "model/tiny_t2v.safetensors"), vae=str(tree / "vae"),
        text_encoder_qwen=str(tree / "text_encoder"), text_encoder_clip=str(tree / "text_encoder2"),
        comfy_models_dir="", dtype="float32",
    )  # fmt: skip
    values.update(changes)
    return list(values.values())


def test_the_ui_listens_on_localhost_only_unless_told():
    args = kandinsky5_gui.parser().parse_args([])
    assert args.host == "127.0.0.1" and not args.share


def test_generate_writes_the_video_and_lists_it(served, tiny_tree):
    client, output = served
    video, picture, settings, gallery = client.predict(*form(tiny_tree), api_name="/generate")
    written = list(output.glob("*_7.mp4"))
    assert len(written) == 1 and picture is None and settings["prompt"] == "a red fox in the snow"
    with av.open(str(written[0])) as container:
        assert sum(1 for _ in container.decode(video=0)) == 9
    assert len(gallery) == 1
    settings = client.predict(str(written[0]), api_name="/settings_of")  # read back from the file itself
    assert settings["prompt"] == "a red fox in the snow" and settings["seed"] == 7 and settings["frames"] == 9
    again = client.predict(str(written[0]), api_name="/reuse_settings")
    assert list(again[:2]) == ["tiny-t2v", "a red fox in the snow"] and again[10] == 7  # the form, filled again


def test_a_bad_path_shows_the_scripts_message(served, tiny_tree, tmp_path):
    from gradio_client.exceptions import AppError

    client, _ = served
    with pytest.raises(AppError, match="does not exist"):
        client.predict(*form(tiny_tree, dit=str(tmp_path / "missing.safetensors")), api_name="/generate")


def test_lora_conversion_from_the_page(served, tiny_tree, tmp_path):
    client, _ = served
    lora = tmp_path / "walk.safetensors"
    write_lora(tiny_tree, "tiny-t2v", "tiny_t2v", lora)
    target = tmp_path / "walk_diffusers.safetensors"
    client.predict("to-diffusers", str(lora), str(target), api_name="/lora_convert")
    assert target.is_file()


def wait_for(check, timeout: float = 240.0, every: float = 1.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"waited {timeout:.0f} s in vain")


def test_train_page_builds_a_dataset_caches_trains_stops_and_resumes(served, tiny_tree, tmp_path):
    import time

    from gradio_client import handle_file

    from kandinsky5.gui import project as projects

    from .media_factory import write_image

    client, _ = served
    folder = str(tmp_path / "project")
    media = [write_image(tmp_path / f"shot{i}.png", 64, 64, seed=i) for i in range(2)]
    rows = client.predict(folder, [handle_file(str(p)) for p in media], api_name="/add_media")
    assert [row[0] for row in rows["data"]] == ["shot0.png", "shot1.png"]
    table = {"headers": ["file", "caption"], "data": [["shot0.png", "a red fox"], ["shot1.png", "a blue fox"]]}
    assert client.predict(folder, table, api_name="/save_captions") == "2 captions saved"
    config = client.predict(folder, "image", 64, 9, api_name="/write_config")
    assert "image_directory" in config and (tmp_path / "project/dataset.toml").read_text().strip() == config.strip()
    report = client.predict(folder, "tiny-t2v", str(tiny_tree / "vae"), str(tiny_tree / "text_encoder"),
                            str(tiny_tree / "text_encoder2"), api_name="/cache")  # fmt: skip
    assert report.count("cached 2") == 2, report

    run = [folder, "tiny-t2v", str(tiny_tree / "model/tiny_t2v.safetensors"), str(tiny_tree / "vae"),
           str(tiny_tree / "text_encoder"), str(tiny_tree / "text_encoder2"), "80 GB", 300, 1e-3, 4,
           "a fox --f 5 --s 2", 25]  # fmt: skip
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="does not exist"):  # the script's message, before any process starts
        client.predict(*run[:2], str(tmp_path / "missing.safetensors"), *run[3:], api_name="/start_training")
    assert "training started" in client.predict(*run, api_name="/start_training")
    project = projects.Project(tmp_path / "project")
    wait_for(lambda: len(projects.curves(project).get("loss/current", [])) >= 2)
    began = time.monotonic()
    loss, _, samples, text, _ = client.predict(folder, api_name="/status")  # answered while a step runs
    assert time.monotonic() - began < 2.0
    assert len(loss["data"]) >= 2 and "steps/s" in text
    wait_for(lambda: projects.latest_samples(project), every=0.1)  # tiny steps are fast: stop well before 300
    assert "stopping" in client.predict(folder, api_name="/stop_training")
    wait_for(lambda: not projects.running(project))
    assert projects.latest_state(project) is not None
    assert "resumed" in client.predict(folder, api_name="/resume_training")
    wait_for(lambda: not projects.running(project) and (project.output / "lora.safetensors").exists())
    log = project.log_file.read_text()
    assert "interrupted at step" in log and "resuming from" in log  # stopped with a state, then continued
    steps = [step for step, _ in projects.curves(project)["loss/current"]]
    assert max(steps) == 300
    *_, loras = client.predict(folder, api_name="/status")
    assert str(project.output / "lora.safetensors") in loras["choices"][-1] or loras


def browser():
    """Headless Debian chromium driven by selenium, or a skip saying what is missing."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/setup.sh installs them as root)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1600",
    ):
        options.add_argument(flag)  # fmt: skip
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(service=Service(driver), options=options)


def test_in_a_real_browser_every_page_shows_a_video_is_generated_and_a_lora_converted(served, tiny_tree, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    client, _ = served
    shots = Path(os.environ.get("KANDINSKY5_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    page = browser()
    try:
        page.get(client.src)
        wait = WebDriverWait(page, 120)
        prompt = wait.until(seen.element_to_be_clickable((By.CSS_SELECTOR, "textarea[data-testid='textbox']")))
        prompt.send_keys("a red fox in the snow")
        primary = page.find_elements(By.CSS_SELECTOR, "button.primary")
        page.execute_script("arguments[0].click()", next(b for b in primary if b.text.strip() == "Generate"))
        try:
            wait.until(lambda p: p.find_elements(By.CSS_SELECTOR, "video[src]"))  # the result plays in the page
        finally:
            page.save_screenshot(str(shots / "gui_generate.png"))
        for tab, marker in (("Train", "Start"), ("LoRA", "Convert")):
            tabs = page.find_elements(By.XPATH, f"//button[normalize-space()='{tab}']")
            page.execute_script("arguments[0].click()", next(t for t in tabs if t.is_displayed()))
            wait.until(seen.visibility_of_element_located((By.XPATH, f"//button[normalize-space()='{marker}']")))
            page.save_screenshot(str(shots / f"gui_{tab.lower()}.png"))
        # on the LoRA page (open now): convert a LoRA by typing its paths and clicking Convert
        lora, target = tmp_path / "walk.safetensors", tmp_path / "walk_diffusers.safetensors"
        write_lora(tiny_tree, "tiny-t2v", "tiny_t2v", lora)

        def box(label: str):
            found = page.find_elements(By.XPATH, f"//label[.//span[normalize-space()='{label}']]//textarea")
            return next(b for b in found if b.is_displayed())

        box("LoRA file").send_keys(str(lora))
        box("Output (a file; a folder for to-official)").send_keys(str(target))
        convert = next(
            b for b in page.find_elements(By.XPATH, "//button[normalize-space()='Convert']") if b.is_displayed()
        )
        page.execute_script("arguments[0].click()", convert)
        wait.until(lambda p: target.is_file())
    finally:
        page.quit()
    assert {p.name for p in shots.glob("gui_*.png")} == {"gui_generate.png", "gui_train.png", "gui_lora.png"}
