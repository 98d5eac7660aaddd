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

from .media_factory import write_image, write_video  # noqa: E402
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
    kandinsky5_gui.serve(app, "127.0.0.1", free_port(), prevent_thread_lock=True)
    yield Client(app.local_url, verbose=False), output
    app.close()


def form(tree, **changes):
    values = dict(
        task="tiny-t2v", prompt="a red fox in the snow", negative_prompt="", image=None, loras="", width=64, height=64,
        frames=9, steps=2, guidance=None, seed=7, fp8=False, blocks_to_swap=0,
        dit=str(tree / "model/tiny_t2v.safetensors"), vae=str(tree / "vae"),
        text_encoder_qwen=str(tree / "text_encoder"), text_encoder_clip=str(tree / "text_encoder2"),
        comfy_models_dir="", dtype="float32", expand_prompt=True, image_last=None, loop=False,
    )  # fmt: skip
    values.update(changes)
    return list(values.values())


def test_the_ui_listens_on_localhost_only_unless_told():
    args = kandinsky5_gui.parser().parse_args([])
    assert args.host == "127.0.0.1" and not args.share


def test_requests_naming_another_site_are_refused(served):
    """DNS rebinding: a page elsewhere reaches 127.0.0.1 under its own name; a cross-site request names its site."""
    import urllib.error
    import urllib.request

    client, _ = served
    url = client.src.rstrip("/") + "/config"
    with urllib.request.urlopen(urllib.request.Request(url)) as answer:
        assert answer.status == 200
    for headers in ({"Host": "evil.example:7860"}, {"Origin": "http://evil.example"}):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers))
        assert refused.value.code == 403
        assert "--allowed_host evil.example" in refused.value.read().decode()
    local = {"Host": "localhost:1", "Origin": "http://127.0.0.1:1"}
    with urllib.request.urlopen(urllib.request.Request(url, headers=local)) as answer:
        assert answer.status == 200


def test_generate_writes_the_video_and_lists_it(served, tiny_tree):
    client, output = served
    video, picture, expanded, settings, gallery = client.predict(*form(tiny_tree), api_name="/generate")
    written = list(output.glob("*_7.mp4"))
    assert len(written) == 1 and picture is None and settings["prompt"] == "a red fox in the snow"
    assert expanded and expanded == settings["expanded_prompt"]  # the prompt Qwen wrote, shown
    with av.open(str(written[0])) as container:
        assert sum(1 for _ in container.decode(video=0)) == 9
    assert len(gallery) == 1
    settings = client.predict(str(written[0]), api_name="/settings_of")  # read back from the file itself
    assert settings["prompt"] == "a red fox in the snow" and settings["seed"] == 7 and settings["frames"] == 9
    again = client.predict(str(written[0]), api_name="/reuse_settings")
    assert list(again[:2]) == ["tiny-t2v", "a red fox in the snow"] and again[10] == 7  # the form, filled again
    assert again[12] is True  # expansion was on


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


def test_start_refuses_with_trainings_own_message_before_a_process_starts(served, tiny_tree, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from kandinsky5.gui import project as projects

    client, _ = served
    folder = tmp_path / "project"
    write_image(tmp_path / "shot.png", 64, 64, seed=0)
    client.predict(str(folder), [handle_file(str(tmp_path / "shot.png"))], api_name="/add_media")
    client.predict(str(folder), "image", 64, 9, api_name="/write_config")
    run = [str(folder), "tiny-t2v", str(tiny_tree / "model/tiny_t2v.safetensors"), str(tiny_tree / "vae"),
           str(tiny_tree / "text_encoder"), str(tiny_tree / "text_encoder2"), "80 GB", 20, 1e-3, 4, "", 5,
           1, "LoRA", False]  # fmt: skip
    with pytest.raises(AppError, match="run the caching commands first"):
        client.predict(*run, api_name="/start_training")
    with pytest.raises(AppError, match="DiT checkpoint .*missing.safetensors does not exist"):
        client.predict(*run[:2], str(tmp_path / "missing.safetensors"), *run[3:], api_name="/start_training")
    with pytest.raises(AppError, match="--sample_prompts needs the text encoders and the VAE: --vae .*absent"):
        client.predict(*run[:3], str(tmp_path / "absent"), *run[4:10], "a fox", 5, 1, "LoRA", False,
                       api_name="/start_training")  # fmt: skip
    assert not projects.Project(folder).pid_file.exists()  # no process was started


def test_caching_lists_a_broken_file_and_caches_the_rest_and_start_names_a_damaged_cache(served, tiny_tree, tmp_path):
    from gradio_client import handle_file

    client, _ = served
    folder = str(tmp_path / "project")
    good = write_image(tmp_path / "good.png", 64, 64, seed=0)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    client.predict(folder, [handle_file(str(good)), handle_file(str(broken))], api_name="/add_media")
    table = {"headers": ["file", "caption"], "data": [["broken.png", "a fox"], ["good.png", "a fox"]]}
    client.predict(folder, table, api_name="/save_captions")
    client.predict(folder, "image", 64, 9, api_name="/write_config")
    report = client.predict(folder, "tiny-t2v", str(tiny_tree / "vae"), str(tiny_tree / "text_encoder"),
                            str(tiny_tree / "text_encoder2"), api_name="/cache")  # fmt: skip
    latents, *failures, captions = report.splitlines()
    assert latents.startswith("latents: cached 1,") and "failed 1" in latents
    assert len(failures) == 1 and "broken.png" in failures[0]  # the script's per-item line, with its reason
    assert captions.startswith("captions: cached 2,")

    # a cache cut short afterwards: Start shows training's message naming it, and starts nothing
    from gradio_client.exceptions import AppError

    from kandinsky5.gui import project as projects

    (latent,) = Path(folder).rglob("good-*_k5tk.safetensors")
    latent.write_bytes(latent.read_bytes()[:100])
    run = [folder, "tiny-t2v", str(tiny_tree / "model/tiny_t2v.safetensors"), str(tiny_tree / "vae"),
           str(tiny_tree / "text_encoder"), str(tiny_tree / "text_encoder2"), "80 GB", 20, 1e-3, 4, "", 5,
           1, "LoRA", False]  # fmt: skip
    with pytest.raises(AppError, match=rf"(?s)are damaged:.*{latent}: cut short.*kandinsky5_cache_latents.py"):
        client.predict(*run, api_name="/start_training")
    assert not projects.Project(folder).pid_file.exists()


def wait_for(check, timeout: float = 240.0, every: float = 0.5):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"waited {timeout:.0f} s in vain")


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


def field(page, label: str):
    """The text box or number input under ``label``, as a user finds it."""
    from selenium.webdriver.common.by import By

    found = page.find_elements(
        By.XPATH, f"//label[.//span[normalize-space()='{label}']]//*[self::textarea or self::input]"
    )
    return next(b for b in found if b.is_displayed())


def type_into(page, label: str, text) -> None:
    from selenium.webdriver.common.keys import Keys

    box = field(page, label)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(text))
    box.send_keys(Keys.TAB)  # leaving the box is what sends its value


def click(page, text: str) -> None:
    from selenium.webdriver.common.by import By

    buttons = page.find_elements(By.XPATH, f"//button[normalize-space()='{text}']")
    page.execute_script("arguments[0].click()", next(b for b in buttons if b.is_displayed()))


def open_tab(page, tab: str) -> None:
    click(page, tab)


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
            open_tab(page, tab)
            wait.until(seen.visibility_of_element_located((By.XPATH, f"//button[normalize-space()='{marker}']")))
            if tab == "LoRA":
                page.save_screenshot(str(shots / "gui_lora.png"))
        # on the LoRA page (open now): convert a LoRA by typing its paths and clicking Convert
        lora, target = tmp_path / "walk.safetensors", tmp_path / "walk_diffusers.safetensors"
        write_lora(tiny_tree, "tiny-t2v", "tiny_t2v", lora)

        type_into(page, "LoRA file", lora)
        type_into(page, "Output (a file; a folder for to-official)", target)
        click(page, "Convert")
        wait.until(lambda p: target.is_file())
    finally:
        page.quit()
    assert {"gui_generate.png", "gui_lora.png"} <= {p.name for p in shots.glob("gui_*.png")}


def plotted_points(page, plot: int) -> int:
    """How many points the ``plot``-th line chart of the page draws (its vega line path's vertices)."""
    from selenium.webdriver.common.by import By

    charts = [c for c in page.find_elements(By.CSS_SELECTOR, "div.vega-embed") if c.is_displayed()]
    if len(charts) <= plot:
        return 0
    from selenium.common.exceptions import StaleElementReferenceException

    try:
        lines = charts[plot].find_elements(By.CSS_SELECTOR, "g.mark-line path")
        return sum(1 + (line.get_attribute("d") or "").count("L") for line in lines)
    except StaleElementReferenceException:  # the chart was drawn again meanwhile: the caller looks again
        return 0


def test_in_a_real_browser_a_dataset_is_built_cached_trained_watched_stopped_and_resumed(served, tmp_path):
    """A user's Train page walk: media uploaded, captions typed into the table, the config written, both
    caches made, a run started that the page watches (curve points, a sample, steps/s) and that stays
    answerable, then Stop (a state is saved) and Resume to the end, and the LoRA offered."""
    import time

    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from kandinsky5.gui import project as projects

    client, _ = served
    shots = Path(os.environ.get("KANDINSKY5_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    media = [write_image(tmp_path / f"shot{i}.png", 64, 64, seed=i) for i in range(2)]
    project = projects.Project(tmp_path / "project")
    page = browser()
    page.set_window_size(1400, 2600)
    try:
        page.get(client.src)
        wait_for(lambda: page.find_elements(By.XPATH, "//button[normalize-space()='Train']"))
        open_tab(page, "Train")
        type_into(page, "Project folder", project.folder)
        upload = page.find_elements(By.CSS_SELECTOR, "input[type=file][multiple]")[0]
        upload.send_keys("\n".join(str(m) for m in media))
        wait_for(lambda: len(page.find_elements(By.XPATH, "//td[contains(@class, 'filename')]")) == 2)
        click(page, "Add to the project")
        cell = wait_for(lambda: page.find_elements(By.CSS_SELECTOR, "[data-testid='cell-1-0']"))[0]
        assert cell.text == "shot1.png"
        for row, caption in ((0, "a red fox"), (1, "a blue fox")):
            ActionChains(page).double_click(
                page.find_element(By.CSS_SELECTOR, f"[data-testid='cell-{row}-1']")
            ).perform()
            editor = wait_for(lambda: page.find_elements(By.CSS_SELECTOR, "textarea[aria-label='Edit cell']"))[0]
            editor.send_keys(caption, Keys.ENTER)
        click(page, "Save captions")
        wait_for(lambda: (project.media / "shot1.txt").exists() and (project.media / "shot1.txt").read_text())
        assert (project.media / "shot0.txt").read_text() == "a red fox\n"
        assert (project.media / "shot1.txt").read_text() == "a blue fox\n"
        image = page.find_elements(By.XPATH, "//label[.//input[@type='radio' and @value='image']]")
        page.execute_script("arguments[0].click()", next(r for r in image if r.is_displayed()))
        click(page, "Write the dataset config")
        wait_for(lambda: project.config.exists() and "image_directory" in project.config.read_text())
        click(page, "Cache latents and captions")
        summary = wait_for(lambda: field(page, "Caching summary").get_attribute("value").count("cached 2") == 2)
        assert summary and "failed 0" in field(page, "Caching summary").get_attribute("value")

        type_into(page, "Steps", 300)  # tiny steps are fast: enough of them that Stop lands mid-run
        type_into(page, "Save (and sample) every N steps", 25)
        type_into(page, "Sample prompt (empty: no samples)", "a fox --f 5 --s 2")
        click(page, "Start")
        wait_for(lambda: "training started" in page.find_element(By.TAG_NAME, "body").text)
        first = wait_for(lambda: plotted_points(page, 0), every=0.1)
        wait_for(lambda: plotted_points(page, 0) > first, every=0.1)  # the curve gains points as it runs
        began = time.monotonic()
        *_, text, _ = client.predict(str(project.folder), api_name="/status")  # answered while steps run
        assert time.monotonic() - began < 2.0 and "steps/s" in text
        wait_for(lambda: page.find_elements(By.CSS_SELECTOR, ".gallery-item video, .gallery-item img"))
        labels = page.find_elements(By.XPATH, "//*[contains(@class, 'gallery-item')]//*[normalize-space()='a fox']")
        assert labels, "each sample is shown with its prompt"
        assert "steps/s" in page.find_element(By.TAG_NAME, "body").text and plotted_points(page, 1)
        page.save_screenshot(str(shots / "gui_train.png"))
        click(page, "Stop (saves a state)")
        wait_for(lambda: "not running" in page.find_element(By.TAG_NAME, "body").text)
        assert "interrupted at step" in project.log_file.read_text()
        click(page, "Resume")
        wait_for(lambda: "resumed" in page.find_element(By.TAG_NAME, "body").text)
        wait_for(lambda: (project.output / "lora.safetensors").exists() and not projects.running(project))
        lora = str(project.output / "lora.safetensors")
        offered = page.find_element(By.CSS_SELECTOR, "input[aria-label='Finished LoRAs']")
        wait_for(lambda: offered.get_attribute("value") == lora)  # offered to the Generate page
    finally:
        page.quit()
    log = project.log_file.read_text()
    assert "resuming from" in log and max(step for step, _ in projects.curves(project)["loss/current"]) == 300


def test_a_run_on_two_processes_is_launched_through_accelerate_stopped_with_a_state_and_resumed(
    served, tiny_tree, tmp_path
):
    """GPUs = 2: accelerate launch --multi_gpu (two CPU processes over gloo here); Stop asks both
    training processes, which agree on the step, save one state and exit; Resume relaunches both."""
    from gradio_client import handle_file

    from kandinsky5.gui import project as projects

    client, _ = served
    project = projects.Project(tmp_path / "project")
    folder = str(project.folder)
    media = [write_image(tmp_path / f"shot{i}.png", 64, 64, seed=i) for i in range(2)]
    captions = [path.with_suffix(".txt") for path in media]
    for path, caption in zip(captions, ("a red fox", "a blue fox"), strict=True):
        path.write_text(caption)
    rows = client.predict(folder, [handle_file(str(p)) for p in media + captions], api_name="/add_media")
    assert rows["data"] == [["shot0.png", "a red fox"], ["shot1.png", "a blue fox"]]  # captions uploaded along
    client.predict(folder, "image", 64, 9, api_name="/write_config")
    client.predict(folder, "tiny-t2v", str(tiny_tree / "vae"), str(tiny_tree / "text_encoder"),
                   str(tiny_tree / "text_encoder2"), api_name="/cache")  # fmt: skip
    run = [folder, "tiny-t2v", str(tiny_tree / "model/tiny_t2v.safetensors"), "", "", "", "80 GB", 100, 1e-3, 4,
           "", 25, 2, "LoKr", True]  # fmt: skip
    assert "training started" in client.predict(*run, api_name="/start_training")
    command = open(f"/proc/{projects.training_pid(project)}/cmdline").read().split("\0")
    assert "accelerate.commands.launch" in command
    assert "networks.lokr_kandinsky" in command and "dora_wd=True" in command  # the page's adapter choice
    wait_for(lambda: len(projects.curves(project).get("loss/current", [])) >= 2, every=0.1)
    assert "stopping" in client.predict(folder, api_name="/stop_training")
    wait_for(lambda: not projects.running(project))
    log = project.log_file.read_text()
    assert log.count("stopping after this step") == 1  # each process is asked; the first one says so
    assert log.count("interrupted at step") == 1 and projects.latest_state(project) is not None
    assert "resumed" in client.predict(folder, api_name="/resume_training")
    wait_for(lambda: not projects.running(project) and (project.output / "lora.safetensors").exists())
    log = project.log_file.read_text()
    assert log.count("resuming from") == 1  # said once, by the first process
    assert max(step for step, _ in projects.curves(project)["loss/current"]) == 100


def test_the_tiny_folder_is_the_demos_and_the_start_line_names_the_share_option(tmp_path):
    import subprocess
    import sys

    demo = (Path(kandinsky5_gui.__file__).parent / ".ci" / "demo").read_text()
    assert kandinsky5_gui.parser().parse_args(["--tiny"]).tiny == "tiny_weights" and "tiny_weights/" in demo
    port = free_port()
    command = [sys.executable, kandinsky5_gui.__file__, "--tiny", str(tmp_path / "tiny"), "--port", str(port),
               "--output_dir", str(tmp_path / "out")]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = iter(server.stdout.readline, "")
        first = next((line.strip() for line in lines if line.startswith("Kandinsky 5 toolkit")), "")
    finally:
        server.terminate()
        server.communicate(timeout=60)
    assert first == f"Kandinsky 5 toolkit: open http://127.0.0.1:{port} (Ctrl-C stops it; --share adds a public " \
        "gradio.live link)"  # fmt: skip


def test_stop_never_signals_a_process_that_took_over_a_stale_pid(tmp_path):
    """#34: a run that ended while no page was open leaves train.pid; its number can go to another process."""
    import subprocess
    import time

    from kandinsky5.gui import project as projects

    project = projects.Project(tmp_path / "project")
    project.folder.mkdir()
    project.run_file.write_text('{"options": [], "processes": 1}')
    stranger = subprocess.Popen(["sleep", "60"])  # a live process that is not ours
    try:
        for stale in (f"{stranger.pid} 1", str(stranger.pid)):  # another start time; an old file without one
            project.pid_file.write_text(stale)
            assert not projects.stop_training(project) and not projects.running(project)
            assert not project.pid_file.exists()  # the stale file is cleared
            time.sleep(0.2)
            assert stranger.poll() is None  # and the process was not signalled
    finally:
        stranger.kill()
        stranger.wait()


def test_bad_project_folders_and_caption_rows_get_messages_not_a_bare_error(served, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client, _ = served
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    with pytest.raises(AppError, match=rf"project folder {a_file}: is a file; give a folder you can write to"):
        client.predict(str(a_file), "image", 64, 9, api_name="/write_config")
    folder = tmp_path / "project"
    write_image(tmp_path / "shot.png", 64, 64, seed=0)
    client.predict(str(folder), [handle_file(str(tmp_path / "shot.png"))], api_name="/add_media")
    for name, message in (
        ("", "the file column must hold the name of one of the project's media"),
        ("..", "the file column must hold the name"),
        ("a\0b.png", "the file column must hold the name"),
        ("x" * 300 + ".png", "longer than 255 bytes"),
        ("other.png", "there is no such image or video in"),
    ):
        table = {"headers": ["file", "caption"], "data": [["shot.png", "a fox"], [name, "a caption"]]}
        with pytest.raises(AppError, match=message):
            client.predict(str(folder), table, api_name="/save_captions")
    assert sorted(p.name for p in (folder / "media").iterdir()) == ["shot.png"]  # nothing written, not even row 1
    assert not (folder / "media.txt").exists() and not list(folder.glob("*.txt"))


def test_resume_shows_trainings_refusal_of_a_damaged_state(served, tiny_tree, tmp_path):
    import json

    from gradio_client.exceptions import AppError

    from kandinsky5.gui import project as projects

    client, _ = served
    project = projects.Project(tmp_path / "project")
    state = project.output / "lora-step00000002-state"
    state.mkdir(parents=True)
    (state / "train_state.json").write_text('{"step": 2}')
    options = ["--task", "tiny-t2v", "--dit", str(tiny_tree / "model/tiny_t2v.safetensors")]
    project.run_file.write_text(json.dumps({"options": options, "processes": 1}))
    project.config.write_text('[[datasets]]\nimage_directory = "media"\ncache_directory = "cache"\n')
    with pytest.raises(AppError, match=r"--resume .*lora-step00000002-state: train_state.json lacks"):
        client.predict(str(project.folder), api_name="/resume_training")
    assert not project.pid_file.exists()


def test_samples_of_a_project_outside_the_served_folders_are_shown(served, tmp_path):
    import shutil
    import tempfile

    from kandinsky5.gui import project as projects

    client, _ = served
    base = Path("/var/tmp")
    if not os.access(base, os.W_OK):
        pytest.skip("needs a writable folder outside the temp folder and the working folder")
    folder = Path(tempfile.mkdtemp(prefix="k5-gui-project-", dir=base))
    try:
        project = projects.Project(folder)
        step = project.output / "sample" / "step00000002"
        step.mkdir(parents=True)
        write_image(step / "000_42.png", 32, 32, seed=1)
        project.sample_prompts_file.write_text("a fox --f 5\n")
        _, _, gallery, text, _ = client.predict(str(folder), api_name="/status")
        assert len(gallery) == 1 and gallery[0]["caption"] == "a fox"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_uploads_larger_than_the_limit_are_refused(tiny_tree, tmp_path):
    from gradio_client import Client, handle_file

    app = kandinsky5_gui.build_app(kandinsky5_gui.tiny_defaults(tiny_tree), tmp_path / "outputs")
    kandinsky5_gui.serve(app, "127.0.0.1", free_port(), prevent_thread_lock=True, max_file_size="1kb")
    try:
        client = Client(app.local_url, verbose=False)
        big = tmp_path / "big.png"
        big.write_bytes(b"\0" * 4096)
        with pytest.raises(Exception, match="(?i)exceed|too large|maximum"):
            client.predict(str(tmp_path / "p"), [handle_file(str(big))], api_name="/add_media")
    finally:
        app.close()
    assert kandinsky5_gui.parser().parse_args([]).max_file_size == "4gb"


def test_in_a_real_browser_captions_show_as_text_and_a_bad_project_folder_shows_its_message(served, tmp_path):
    from selenium.webdriver.common.by import By

    from kandinsky5.gui import project as projects

    client, _ = served
    project = projects.Project(tmp_path / "project")
    project.media.mkdir(parents=True)
    write_image(project.media / "shot.png", 64, 64, seed=0)
    hostile = '<img src=x onerror="window.k5pwned=1">a fox'
    (project.media / "shot.txt").write_text(hostile)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    page = browser()
    try:
        page.get(client.src)
        wait_for(lambda: page.find_elements(By.XPATH, "//button[normalize-space()='Train']"))
        open_tab(page, "Train")
        type_into(page, "Project folder", project.folder)
        cell = wait_for(lambda: [c for c in page.find_elements(By.CSS_SELECTOR, "[data-testid='cell-0-1']") if c.text])
        assert cell[0].text == hostile  # the markup as text, not an element
        assert page.execute_script("return window.k5pwned") is None
        type_into(page, "Project folder", a_file)
        click(page, "Write the dataset config")
        wait_for(lambda: "is a file; give a folder you can write to" in page.find_element(By.TAG_NAME, "body").text)
    finally:
        page.quit()


def test_an_i2v_picture_dropped_on_the_page_is_the_first_frame_and_zero_fields_take_the_tasks_values(
    served, tiny_tree, tmp_path
):
    """#33: the Generate page takes the image as an upload (drag and drop), shows the values used, and its
    LoRA conversion names ComfyUI."""
    from gradio_client import handle_file

    from kandinsky5.gui.lora_page import CONVERSIONS

    client, output = served
    picture = write_image(tmp_path / "first.png", 96, 64, seed=3)
    values = form(tiny_tree, task="tiny-i2v", image=handle_file(str(picture)), width=0, height=0, seed=11)
    video, _, _, settings, _ = client.predict(*values, api_name="/generate")
    assert video and settings["image"] and settings["width"] > 0 and settings["height"] > 0  # the values used
    assert settings["width"] > settings["height"]  # the picture's aspect (96 x 64), not the task's square
    assert settings["guidance"] == 5.0  # 0 in the form: the task's
    assert any("ComfyUI" in label and command == "to-kohya" for label, command in CONVERSIONS)


def test_caption_with_qwen_fills_the_table_keeping_typed_captions_and_saves_only_when_asked(
    served, tiny_tree, tmp_path
):
    client, _ = served
    folder = tmp_path / "captioned"
    media = folder / "media"
    media.mkdir(parents=True)
    write_image(media / "shot0.png", 64, 48, seed=1)
    write_image(media / "shot1.png", 40, 64, seed=2)
    write_video(media / "clip.mp4", 9, 64, 48)
    (media / "broken.png").write_bytes(b"not a png")
    typed = {"headers": ["file", "caption"], "data": [["broken.png", ""], ["clip.mp4", ""], ["shot0.png", "typed"],
                                                      ["shot1.png", ""]]}  # fmt: skip
    qwen = str(tiny_tree / "text_encoder")
    rows = client.predict(str(folder), qwen, typed, "zxq, ", False, api_name="/caption_with_qwen")["data"]
    by_name = dict(rows)
    assert by_name["shot0.png"] == "typed" and by_name["broken.png"] == ""
    assert by_name["clip.mp4"].startswith("zxq, ") and by_name["shot1.png"].startswith("zxq, ")
    assert not list(media.glob("*.txt"))  # shown for editing, written by Save captions
    replaced = dict(client.predict(str(folder), qwen, typed, "", True, api_name="/caption_with_qwen")["data"])
    assert replaced["shot0.png"] != "typed" and not replaced["shot0.png"].startswith("zxq, ")


def test_in_a_real_browser_caption_with_qwen_fills_the_captions_table(served, tiny_tree, tmp_path):
    from selenium.webdriver.common.by import By

    client, _ = served
    media = tmp_path / "project" / "media"
    media.mkdir(parents=True)
    write_image(media / "shot.png", 64, 64, seed=3)
    page = browser()
    try:
        page.get(client.src)
        wait_for(lambda: page.find_elements(By.XPATH, "//button[normalize-space()='Train']"))
        open_tab(page, "Train")
        type_into(page, "Qwen2.5-VL", tiny_tree / "text_encoder")
        type_into(page, "Project folder", media.parent)
        wait_for(lambda: page.find_elements(By.CSS_SELECTOR, "[data-testid='cell-0-0']"))
        type_into(page, "Caption prefix (a trigger word)", "zxq style, ")
        click(page, "Caption with Qwen")
        cell = wait_for(
            lambda: [c for c in page.find_elements(By.CSS_SELECTOR, "[data-testid='cell-0-1']") if c.text], every=0.2
        )
        assert cell[0].text.startswith("zxq style, ")
        click(page, "Save captions")
        wait_for(lambda: (media / "shot.txt").exists())
        assert (media / "shot.txt").read_text().startswith("zxq style, ")
    finally:
        page.quit()


def test_the_generate_page_takes_an_i2v_last_frame_and_a_loop(served, tiny_tree, tmp_path):
    from gradio_client import handle_file

    client, _ = served
    first = write_image(tmp_path / "first.png", 64, 64, seed=4)
    last = write_image(tmp_path / "last.png", 64, 64, seed=5)
    values = form(tiny_tree, task="tiny-i2v", image=handle_file(str(first)), image_last=handle_file(str(last)))
    video, _, _, settings, _ = client.predict(*values, api_name="/generate")
    assert video and settings["image_last"] and Path(settings["image_last"]).name == "last.png"
    values = form(tiny_tree, task="tiny-i2v", image=handle_file(str(first)), loop=True)
    _, _, _, settings, _ = client.predict(*values, api_name="/generate")
    assert settings["image_last"] == settings["image"]  # the loop: the first image is the last frame
