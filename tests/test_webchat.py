"""The web chat (``medvlm chat --web``): a running Gradio server driven by ``gradio_client`` and by a real
headless Chromium (upload a DICOM, ask, see the answer, screenshot)."""

from __future__ import annotations

import time

import pytest

from medvlm.generate import generate_answers
from medvlm.sample_images import sample_path
from medvlm.webchat import Decoding, conversation_turns, reply
from tests.browser import start_chromium

CT = sample_path("CT_small.dcm", "pydicom")


def _same_text(a: str, b: str) -> bool:
    """The chat display collapses whitespace (a tiny random model emits tabs)."""
    return a.split() == b.split()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from medvlm.model import build_tiny, load_checkpoint, save_folder
    from medvlm.webchat import launch

    checkpoint = save_folder(build_tiny(), tmp_path_factory.mktemp("web") / "checkpoint")
    app, url = launch(checkpoint, block=False, decoding=Decoding(max_new_tokens=8))
    yield {"url": url, "bundle": load_checkpoint(checkpoint), "checkpoint": checkpoint}
    app.close()


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _text(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def test_first_turn_is_the_greedy_answer_medvlm_chat_gives(server):
    from gradio_client import Client, handle_file

    client = Client(server["url"], verbose=False)
    history, cleared = client.predict(handle_file(str(CT)), "What does the image show?", [], 8, 0.0, 1.0, api_name="/ask")
    expected = generate_answers(server["bundle"], ["What does the image show?"], [CT], max_new_tokens=8)[0]
    assert [m["role"] for m in history] == ["user", "assistant"] and cleared == ""
    assert _same_text(_text(history[1]), expected)


def test_second_turn_sees_the_whole_conversation(server):
    from gradio_client import Client, handle_file

    client = Client(server["url"], verbose=False)
    first, _ = client.predict(handle_file(str(CT)), "What does the image show?", [], 8, 0.0, 1.0, api_name="/ask")
    second, _ = client.predict(handle_file(str(CT)), "Which organ?", first, 8, 0.0, 1.0, api_name="/ask")
    assert [_text(m) for m in second[:2]] == [_text(m) for m in first]
    history = [{"role": "user", "content": "What does the image show?"},
               {"role": "assistant", "content": _text(first[1])}]
    assert _same_text(_text(second[3]), reply(server["bundle"], history, "Which organ?", CT, Decoding(max_new_tokens=8)))


def test_a_dicom_upload_is_previewed_as_the_model_sees_it(server):
    from gradio_client import Client, handle_file
    from PIL import Image

    from medvlm.imaging import load_image

    preview, chat, status = Client(server["url"], verbose=False).predict(handle_file(str(CT)), api_name="/preview")
    assert Image.open(preview).size == load_image(CT).size
    assert chat == [] and "CT_small.dcm" in status


def test_a_file_that_is_no_image_gives_a_readable_error(server, tmp_path):
    from gradio_client import Client, handle_file

    bad = tmp_path / "notes.dcm"
    bad.write_text("not a scan")
    with pytest.raises(Exception, match="notes.dcm"):
        Client(server["url"], verbose=False).predict(handle_file(str(bad)), api_name="/preview")


def test_conversation_turns_put_the_image_in_the_first_question():
    turns = conversation_turns([{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}], "q2", True)
    assert turns == [{"from": "human", "value": "<image>\nq1"}, {"from": "gpt", "value": "a1"},
                     {"from": "human", "value": "q2"}]


def test_chromium_uploads_asks_and_sees_the_answer(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = start_chromium(1280, 1000)
    try:
        browser.get(server["url"])
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#image-upload input[type=file]"))
        page = browser.find_element(By.TAG_NAME, "body").text
        assert "template" in page and "llava_v1" in page and "temperature" in page
        browser.find_element(By.CSS_SELECTOR, "#image-upload input[type=file]").send_keys(str(CT))
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#image-preview img"))
        browser.find_element(By.CSS_SELECTOR, "#question textarea").send_keys("What does the image show?")
        browser.find_element(By.CSS_SELECTOR, "#ask").click()
        expected = generate_answers(server["bundle"], ["What does the image show?"], [CT], max_new_tokens=8)[0]
        wait.until(lambda b: " ".join(expected.split()) in " ".join(b.find_element(By.ID, "conversation").text.split()))
        time.sleep(0.2)
        shot = tmp_path / "webchat.png"
        assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert browser.execute_script("return document.querySelector('#image-preview img').naturalWidth") > 0
    finally:
        browser.quit()


def test_chat_without_a_question_or_web_is_a_usage_error(server, capsys):
    from medvlm.cli import main

    assert main(["chat", "--model", str(server["checkpoint"])]) == 2
    assert "--web" in capsys.readouterr().err


@pytest.mark.slow  # a second server process: its start-up (imports, model load) takes most of a minute on 2 cores
def test_medvlm_chat_web_serves_the_app_until_stopped(server, tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from gradio_client import Client, handle_file

    from tests.conftest import free_port, stop_process_group

    port = free_port()
    command = [str(Path(sys.executable).parent / "medvlm"), "chat", "--model", str(server["checkpoint"]), "--web",
               "--port", str(port), "--max-new-tokens", "8"]
    log = tmp_path / "web.log"
    with open(log, "w") as out:
        app = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not _answers(f"http://127.0.0.1:{port}/"):
            assert app.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        history, _ = client.predict(handle_file(str(CT)), "What does the image show?", [], 8, 0.0, 1.0, api_name="/ask")
        expected = generate_answers(server["bundle"], ["What does the image show?"], [CT], max_new_tokens=8)[0]
        assert _same_text(_text(history[1]), expected)
    finally:
        stop_process_group(app, signal.SIGINT)
