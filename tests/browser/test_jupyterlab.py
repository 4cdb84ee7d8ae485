"""The notebooks as a reader sees them: JupyterLab 4 in headless Chromium, tiny model, smoke sizes.

Run by ``make browser-test`` (which installs Chromium and Playwright) and by ``.ci/run``; ``make test`` skips them
(marker ``browser``). Screenshots of every step go to ``outputs/browser/``; a failure names the one to look at.
The series' own outputs (adapters, plots) of this run go to ``outputs/browser/series/``, emptied at the start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from browser_lab import SCREENSHOTS, JupyterLab, papermill  # tests/browser/browser_lab.py

pytestmark = pytest.mark.browser

SERIES_OUTPUTS = SCREENSHOTS / "series"  # PHI3_LORA_OUTPUTS of this run (the test's own folder)
# For the README's chat picture on a model that answers in words: PHI3_LORA_BROWSER_MODEL=smol and this variable set
# to an outputs folder holding smol's 03/04 adapters (e.g. `make demo`'s outputs/), with `-k 06`.
ADAPTERS_ENV_VAR = "PHI3_LORA_BROWSER_ADAPTERS"
TIMINGS: dict[str, float] = {}
STOPS: list[bool] = []  # per chat answer: ended by a stop id (True) or by the token budget
STREAMED: list[dict] = []  # per chat answer: its text, the transcript updates received and the states drawn


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterLab]:
    """The pinned JupyterLab on copies of the notebooks and a Chromium page on it; both stopped at the end."""
    if SERIES_OUTPUTS.exists():
        shutil.rmtree(SERIES_OUTPUTS)
    for old in SCREENSHOTS.glob("*.png"):
        old.unlink()
    started = time.monotonic()
    server = JupyterLab(tmp_path_factory.mktemp("lab"), SERIES_OUTPUTS)
    try:
        server.start()
        TIMINGS["start"] = time.monotonic() - started
        yield server
    finally:
        server.stop()
        TIMINGS["total"] = time.monotonic() - started
        report = {"seconds": TIMINGS, "chat answers ended by a stop id": STOPS, "chat answers": STREAMED}
        (SCREENSHOTS / "timings.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


def test_00_runs_top_to_bottom_and_draws_the_memory_plot(lab: JupyterLab) -> None:
    started = time.monotonic()
    lab.open_notebook("00_setup.ipynb")
    lab.shot("00-opened")
    lab.run_all()
    lab.wait_until_run("00", timeout=240)
    plot = lab.code_cell('plots/00_memory_estimate.png').locator(".jp-RenderedImage img")
    if plot.count() != 1 or not (plot.get_attribute("src") or "").startswith("data:image/png"):
        raise lab.fail("00: the memory plot is not shown as an image below its cell", "00-no-plot")
    plot.scroll_into_view_if_needed()
    size = plot.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    if min(size) < 100:
        raise lab.fail(f"00: the memory plot is only {size} pixels", "00-small-plot")
    lab.shot("00-memory-plot")
    TIMINGS["00"] = time.monotonic() - started


def test_03_shows_the_trainers_live_table_and_widget_bars(lab: JupyterLab) -> None:
    started = time.monotonic()
    lab.open_notebook("03_lora_finetuning.ipynb")
    lab.run_all()
    training = lab.code_cell("trainer.train(resume_from_checkpoint")
    # Live: the training cell is running ([*]) and its output holds the Trainer's table and a <progress> bar
    # part-way (at least one optimizer step done, not all).
    live = ("cell => cell.querySelector('.jp-InputArea-prompt').textContent.includes('*') && "
            "!!cell.querySelector('.jp-OutputArea-output table') && "
            "Array.from(cell.querySelectorAll('.jp-OutputArea-output progress'))"
            ".some(bar => +bar.value >= 1 && +bar.value < +bar.max)")
    try:
        training.wait_for(state="attached", timeout=30_000)
        deadline = time.monotonic() + 240
        while not training.evaluate(live):
            lab.check_errors("03")
            if time.monotonic() > deadline:
                raise TimeoutError("no live table within 240 s")
            time.sleep(0.1)
    except TimeoutError as error:
        raise lab.fail(f"03: the Trainer's live progress table never showed while training ({error})",
                       "03-no-live-table") from None
    training.locator(".jp-OutputArea-output progress").first.scroll_into_view_if_needed()
    lab.shot("03-training-live")
    live_text = training.locator(".jp-OutputArea").inner_text()
    assert re.search(r"\[\s*\d+/\d+", live_text), f"03: no step counter in the live table: {live_text[:500]}"
    lab.wait_until_run("03", timeout=300)
    table = training.locator(".jp-OutputArea-output table").first.inner_text()
    if "Validation Loss" not in table:
        raise lab.fail(f"03: the Trainer's table has no validation loss column:\n{table[:800]}", "03-table")
    training.locator(".jp-OutputArea-output table").first.scroll_into_view_if_needed()
    lab.shot("03-training-done")
    # tqdm.auto bars (datasets, weight loading, ...) render as ipywidgets progress bars, not as text.
    bars = lab.page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output .widget-hprogress")
    if bars.count() == 0:
        raise lab.fail("03: no progress bar rendered as a widget (is jupyterlab-widgets installed?)", "03-no-widgets")
    broken = lab.page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output",
                              has_text=re.compile(r"Error displaying widget|HBox\(children="))
    if broken.count():
        raise lab.fail(f"03: a widget did not render: {broken.first.inner_text()[:300]}", "03-broken-widget")
    # ... the series' own bars too: fit_to_length's "tokenizing" bar (utils/tokenization.py, tqdm.auto).
    ours = lab.code_cell("fit_to_length(train_conversations").locator(".widget-hprogress")
    if ours.count() == 0:
        raise lab.fail("03: tokenizing the training data shows no widget progress bar", "03-no-tokenizing-bar")
    labels = lab.code_cell("fit_to_length(train_conversations").locator(".jp-OutputArea").inner_text()
    assert "tokenizing" in labels and "100%" in labels, labels[:500]
    ours.first.scroll_into_view_if_needed()
    lab.shot("03-widget-bar")
    TIMINGS["03"] = time.monotonic() - started


def transcript(lab: JupyterLab) -> str:
    """The chat box's transcript as the page shows it."""
    return lab.page.locator(".jp-OutputArea-output .widget-textarea textarea").input_value()


TRANSCRIPT_UPDATE = re.compile(r'"value"\s*:\s*"You: ')  # a widget update message that sets the transcript


def send_and_watch(lab: JupyterLab, question: str, name: str, timeout: float = 120) -> tuple[str, list[str], int]:
    """Type a question, press Send, and wait for the complete answer; the transcript, the values the page showed,
    and how many transcript updates the page received from the kernel for this answer."""
    before = transcript(lab)
    first_frame = len(lab.comm_frames)
    lab.page.evaluate("""() => {  // samples the transcript as often as the page can, while the answer streams in
        const box = document.querySelector('.jp-OutputArea-output .widget-textarea textarea');
        window.__seen = [box.value];
        window.__sampler = setInterval(() => {
            if (box.value !== window.__seen[window.__seen.length - 1]) window.__seen.push(box.value); }, 2);
    }""")
    entry = lab.page.locator(".jp-OutputArea-output .widget-text input[placeholder^='Ask']")
    entry.click()
    entry.fill(question)
    lab.page.locator(".jp-OutputArea-output button", has_text=re.compile(r"^Send$")).click()
    # Done when the answer is closed by its blank line, the kernel is idle (Send runs the whole answer in the
    # kernel) and the transcript has not changed for 2 s (an answer may itself hold blank lines).
    deadline = time.monotonic() + timeout
    idle = lab.page.locator(".jp-StatusBar-Widget", has_text=re.compile(r"\| Idle")).first
    last, since = None, time.monotonic()
    while True:
        now = transcript(lab)
        if now != last:
            last, since = now, time.monotonic()
        elif (now.startswith(before + f"You: {question}\nCoach: ") and now.endswith("\n\n") and idle.count()
              and time.monotonic() - since > 2):
            break
        if time.monotonic() > deadline:
            raise lab.fail(f"06: no complete answer within {timeout:.0f} s: {now!r}", name)
        time.sleep(0.1)
    seen = lab.page.evaluate("() => { clearInterval(window.__sampler); return window.__seen; }")
    box = lab.page.locator(".jp-OutputArea-output .widget-textarea textarea")
    box.evaluate("area => { area.scrollTop = area.scrollHeight; }")  # the newest turn in view
    lab.shot(name)
    updates = sum(bool(TRANSCRIPT_UPDATE.search(frame)) for frame in lab.comm_frames[first_frame:])
    return transcript(lab), seen, updates


def run_new_cell(lab: JupyterLab, code: str, marker: str) -> str:
    """Add a cell at the end of the notebook, type ``code``, run it; the output line after ``marker``."""
    lab.page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell").last.click()
    lab.page.keyboard.press("Escape")
    lab.page.keyboard.press("b")  # command mode: a new cell below
    lab.page.keyboard.press("Enter")  # edit it
    lab.page.keyboard.insert_text(code)
    lab.page.keyboard.press("Shift+Enter")
    output = lab.page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output", has_text=marker)
    output.last.wait_for(timeout=60_000)
    return output.last.inner_text().split(marker, 1)[1].strip().splitlines()[0]


# Typed by the "reader" after chatting: the session's history, and each answer decoded again greedily by another
# path (generate_batch: no streamer, cut at the first stop id), with whether a stop id ended it.
INSPECT = """import json
from utils.generation import generate_batch
again = [generate_batch(reloaded, reloaded_tokenizer, [session.history[:turn]],
                        GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, batch_size=1))[0]
         for turn in (1, 3)]
print("HISTORY>", json.dumps({"history": session.history, "max_new_tokens": MAX_NEW_TOKENS,
                              "again": [(g.text, len(g.token_ids), g.stopped) for g in again]}))
"""


def test_06_chat_box_streams_two_turns_with_history_and_clears(lab: JupyterLab) -> None:
    started = time.monotonic()
    given = os.environ.get(ADAPTERS_ENV_VAR)  # an outputs folder whose adapters 06 should use (copied, not changed)
    for notebook, adapter in (("03_lora_finetuning.ipynb", "lora"), ("04_qlora_finetuning.ipynb", "qlora")):
        target = SERIES_OUTPUTS / "adapters" / adapter
        if given:
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(Path(given) / "adapters" / adapter, target)
        if not (SERIES_OUTPUTS / "adapters" / adapter / "adapter_config.json").is_file():
            papermill(notebook, lab)  # 06 merges 03's and 04's adapters from the same outputs folder
    TIMINGS["adapters"] = time.monotonic() - started
    lab.open_notebook("06_inference.ipynb")
    lab.run_all()
    lab.wait_until_run("06", timeout=300)
    box = lab.page.locator(".jp-OutputArea-output .widget-textarea textarea")
    if box.count() != 1:
        raise lab.fail("06: the chat box (a transcript, a text field, Send and Clear) is not shown", "06-no-chat-box")
    box.scroll_into_view_if_needed()
    assert transcript(lab) == ""
    lab.shot("06-chat-box")

    first_q, second_q = "How do I keep cut apples from turning brown?", "And what about avocado?"
    after_first, seen_first, updates_first = send_and_watch(lab, first_q, "06-chat-first-answer")
    after_second, seen_second, updates_second = send_and_watch(lab, second_q, "06-chat-second-answer")
    chat = lab.page.locator(".jp-OutputArea-output:has(.widget-textarea)")
    chat.screenshot(path=str(SCREENSHOTS / "06-chat.png"))  # the chat box alone (tools/readme_pictures.py uses it)
    history = json.loads(run_new_cell(lab, INSPECT, "HISTORY>"))
    turns = history["history"]
    # Two turns, each shown as "You: ...\nCoach: <answer>\n\n"; the second prompt carried the first turn.
    if [m["role"] for m in turns] != ["user", "assistant", "user", "assistant"]:
        raise lab.fail(f"06: the session's history is not two turns: {turns}", "06-history")
    first_a, second_a = turns[1]["content"], turns[3]["content"]
    assert after_first == f"You: {first_q}\nCoach: {first_a}\n\n", (after_first, first_a)
    assert after_second == after_first + f"You: {second_q}\nCoach: {second_a}\n\n", (after_second, second_a)
    assert turns[0]["content"] == first_q and turns[2]["content"] == second_q
    # Streamed: the page received the answer in pieces, each a widget update of the transcript: "You: ...\nCoach: ",
    # then every piece TextIteratorStreamer hands over (whole words and lines: an answer with a break inside comes
    # in two or more), then the closing blank line. (On the tiny model the pieces arrive within milliseconds, so the
    # page may draw only some of them; the updates themselves are counted.)
    for answer, seen, updates, start, end in (
            (first_a, seen_first, updates_first, f"You: {first_q}\nCoach: ", after_first),
            (second_a, seen_second, updates_second, after_first + f"You: {second_q}\nCoach: ", after_second)):
        partial = [value for value in seen if value.startswith(start) and value not in (start, end)]
        STREAMED.append({"answer": answer, "transcript updates received": updates,
                         "partial states drawn": len(partial)})
        pieces = 2 if re.search(r"\S\s+\S|\n.*\n", answer, re.DOTALL) else 1 if answer else 0
        if updates < pieces + 2:
            raise lab.fail(f"06: the answer {answer!r} reached the page in {updates} transcript updates, not "
                           f"streamed (expected at least {pieces + 2})", "06-chat-second-answer")
    # The stream stops where the reply ends: the page shows exactly the greedy answer cut at the first stop id
    # (<|end|> or <|endoftext|>), or at the token budget when no stop id came; nothing after it, no role marker.
    for answer, (text, length, stopped) in zip((first_a, second_a), history["again"]):
        assert answer == text, (answer, text)
        assert stopped or length == history["max_new_tokens"], (answer, length, stopped)
        assert not re.search(r"<\|(user|assistant|end|endoftext|system)\|>|<\|im_(start|end)\|>", answer), answer
    STOPS.extend(stopped for _, _, stopped in history["again"])
    lab.page.locator(".jp-OutputArea-output button", has_text=re.compile(r"^Clear$")).click()
    lab.page.wait_for_function(
        "() => document.querySelector('.jp-OutputArea-output .widget-textarea textarea').value === ''")
    box.scroll_into_view_if_needed()
    lab.shot("06-chat-cleared")
    cleared = json.loads(run_new_cell(lab, 'print("HISTORY>", json.dumps(session.history))', "HISTORY>"))
    assert cleared == [], cleared
    TIMINGS["06"] = time.monotonic() - started
