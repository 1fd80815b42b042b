"""sandkernel solve: its parser, and a run against a scripted model."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest

from sandkernel import cli
from sandkernel._solve_cli import _Progress, add_solve_parser, run_solve, solve_with_engine
from sandkernel.errors import BadInput, FileNotFoundInStore, ModelCallFailed
from sandkernel.loop import LoopEvent, ModelReply, ToolCall
from tests._model import ScriptedModel, in_order
from tests.loop._support import EngineFactory, code, completion, produced


@pytest.mark.sandbox
@pytest.mark.anyio
async def test_solve_prints_each_attempt_and_saves_the_chart(
    engine_factory: EngineFactory, tmp_path: Path
) -> None:
    engine = await engine_factory()
    data = tmp_path / "data.csv"
    data.write_text("month,sales\n1,10\n2,12\n")
    chart = (
        "import pandas as pd, matplotlib.pyplot as plt\n"
        "sales = pd.read_csv('/mnt/data/data.csv')\n"
        "sales.describe().to_csv('/mnt/data/summary.csv')\n"
        "plt.plot(sales.month, sales.sales)\nplt.show()"
    )
    script = [
        completion(None, [("c1", code("plt.plot([10, 12])"))]),
        completion("plt was not imported.", [("c2", code(chart))]),
        completion("Sales grew from 10 to 12; the chart is saved."),
    ]
    parser = argparse.ArgumentParser()
    add_solve_parser(parser.add_subparsers(dest="command"))
    out = io.StringIO()
    async with ScriptedModel(in_order(*script)) as server:
        args = parser.parse_args(
            ["solve", "Chart the sales", "--base-url", server.base_url, "--model", "scripted"]
            + ["--api-key", "sk-test", "--file", str(data), "--max-attempts", "3"]
            + ["--out", str(tmp_path / "out"), "--timeout", "60"]
        )
        code_ = await solve_with_engine(args, engine, out=out, client_kwargs={"max_retries": 0})
    printed = out.getvalue()
    assert code_ == 0, printed
    assert "=== attempt 1/3 ===\n  | plt.plot([10, 12])\n  Status: error: NameError" in printed
    assert "model: plt was not imported." in printed and "=== attempt 2/3 ===" in printed
    assert "=== answer ===\nSales grew from 10 to 12; the chart is saved." in printed
    assert printed.startswith("uploaded to /mnt/data: data.csv\n")
    assert server.requests[0]["messages"][0]["role"] == "system"
    assert server.requests[0]["messages"][1]["content"].endswith("Files in /mnt/data: data.csv")
    assert "files saved in" in printed
    saved = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert saved["summary.csv"].startswith(b",month,sales\ncount,2.0,2.0")
    pngs = [name for name, data in saved.items() if data.startswith(b"\x89PNG")]
    assert pngs == ["image-2-1.png"], sorted(saved)


@pytest.mark.sandbox
@pytest.mark.anyio
async def test_solve_keeps_the_files_made_before_the_model_failed(
    engine_factory: EngineFactory, tmp_path: Path
) -> None:
    engine = await engine_factory()
    report = "open('/mnt/data/report.csv', 'w').write('a,b\\n1,2\\n')\nprint('saved')"
    parser = argparse.ArgumentParser()
    add_solve_parser(parser.add_subparsers(dest="command"))
    out = io.StringIO()
    # One reply, then the endpoint fails (500: the script has no more replies).
    async with ScriptedModel(in_order(completion(None, [("c1", code(report))]))) as server:
        args = parser.parse_args(
            ["solve", "Make a report", "--base-url", server.base_url, "--model", "scripted"]
            + ["--api-key", "sk-test", "--out", str(tmp_path / "out")]
        )
        with pytest.raises(ModelCallFailed, match="500"):
            await solve_with_engine(args, engine, out=out, client_kwargs={"max_retries": 0})
    assert len(server.requests) == 2
    assert (tmp_path / "out" / "report.csv").read_text() == "a,b\n1,2\n"
    printed = out.getvalue()
    assert printed.endswith(
        f"\nfiles saved in {tmp_path / 'out'}/ before the failure: report.csv\n"
    )


@pytest.mark.anyio
async def test_files_that_cannot_be_saved_after_a_failure_are_listed_by_id(
    tmp_path: Path,
) -> None:
    from sandkernel._solve_cli import _save_after_failure

    class StoreGone:
        async def download(self, file_id: str) -> bytes:
            raise FileNotFoundInStore(f"no stored file {file_id}")

    chart = produced("chart.png", "image/png", 10)
    out = io.StringIO()
    await _save_after_failure(StoreGone(), [chart], str(tmp_path / "out"), out)  # type: ignore[arg-type]
    assert f"\n  {chart.id}  chart.png\n" in out.getvalue()
    assert "sandkernel files get ID" in out.getvalue()


def test_solve_with_a_base_url_that_is_no_url_says_so_before_a_sandbox_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def no_engine(**kwargs: object) -> None:
        raise AssertionError("a sandbox was started for a model that cannot be called")

    monkeypatch.setattr("sandkernel.engine.Engine", no_engine)
    url = "http://127.0.0.1:8o80/v1"  # the letter o for a zero
    argv = ["solve", "Sum 1..10", "--base-url", url, "--model", "m", "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("sandkernel: ")
    assert f"base URL {url!r} is not a valid URL" in error and "8o80" in error


def test_solve_parser_takes_the_documented_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    parser = argparse.ArgumentParser()
    add_solve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["solve", "task", "--model", "m", "--file", "a", "--file", "b"])
    assert args.base_url == "http://127.0.0.1:9/v1" and args.file == ["a", "b"]
    assert (args.max_attempts, args.out, args.policy, args.timeout) == (
        5,
        "solve-output",
        None,
        None,
    )
    assert args.api_key is None and args.tool_choice == "auto"


def test_solve_without_a_model_to_ask_says_so_before_starting_anything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    parser = argparse.ArgumentParser()
    add_solve_parser(parser.add_subparsers(dest="command"))
    with pytest.raises(BadInput, match="set OPENAI_API_KEY .* or --base-url"):
        run_solve(parser.parse_args(["solve", "task", "--model", "m"]))


def test_solve_options_that_cannot_be_used_exit_2_with_one_line_saying_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    data, twin, missing = tmp_path / "data.csv", tmp_path / "b" / "data.csv", tmp_path / "m.csv"
    twin.parent.mkdir()
    data.write_text("x\n1\n")
    twin.write_text("y\n2\n")
    model = ["--base-url", "http://127.0.0.1:9/v1"]
    for args, why in [
        ([*model, "--file", str(missing)], f"--file: no such file: {missing}"),
        ([*model, "--file", str(data), "--file", str(twin)],
         "two files named data.csv: each --file needs a name of its own in /mnt/data "
         "(rename or copy one)"),
        ([*model, "--out", str(data)], f"--out {data} is not a folder"),
        ([], "no model to ask: set OPENAI_API_KEY (or --api-key) for OpenAI, or --base-url "
         "for an OpenAI-compatible server"),
    ]:  # fmt: skip
        assert cli.main(["solve", "task", "--model", "m", *args]) == 2, args
        assert capsys.readouterr().err == f"sandkernel: {why}\n"


def test_progress_shows_half_a_character_a_model_wrote_escaped() -> None:
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8")  # as a terminal's: strict UTF-8
    reply = ModelReply(
        content="Printing \ud83d now.",
        tool_calls=[ToolCall(id="c1", name="python", arguments="{}")],
    )
    _Progress(out, max_attempts=3)(LoopEvent(kind="model_reply", attempt=0, reply=reply))
    out.flush()
    assert raw.getvalue().decode() == "\nmodel: Printing \\ud83d now.\n"


def test_saved_names_keep_their_backslashes_and_stay_in_the_folder() -> None:
    from sandkernel._solve_cli import _safe_name

    assert _safe_name("/mnt/data/caf\\xe9.csv") == "caf\\xe9.csv"  # an escaped byte
    assert _safe_name("Q1\\tsales.csv") == "Q1\\tsales.csv"
    assert _safe_name("/mnt/data/sub/../..") == "file" and _safe_name("../x.csv") == "x.csv"
