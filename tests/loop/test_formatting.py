"""format_result: the text a model reads for one cell."""

from __future__ import annotations

import re

from sandkernel.loop import format_result
from sandkernel.results import DisplayOutput, ErrorInfo
from tests.loop._support import (
    DATAFRAME_HTML,
    MONTHLY_FRAME,
    MONTHLY_FRAME_HTML,
    PNG_B64,
    SMALL_FRAME,
    SMALL_FRAME_HTML,
    TIMEIT_KEYERROR,
    DATAFRAME_100x3,
    check_snapshot,
    make_result,
    produced,
)

# --------------------------------------------------------------------------- snapshots


def test_snapshot_ok_with_stdout_and_value() -> None:
    result = make_result(
        status="ok",
        stdout="rows: 3\nmean: 2.0\n",
        value=DisplayOutput(data={"text/plain": "{'rows': 3, 'mean': 2.0}"}),
        execution_count=3,
    )
    check_snapshot("ok", format_result(result))


def test_snapshot_error_keeps_only_the_users_frames() -> None:
    result = make_result(
        status="error",
        error=ErrorInfo(name="KeyError", value="'revenue'", traceback=TIMEIT_KEYERROR),
        execution_count=7,
    )
    text = format_result(result)
    check_snapshot("error", text)
    assert "IPython" not in text and "magic-timeit" not in text and "interactiveshell" not in text
    assert "Cell In[6], line 4, in summarise(frame)" in text
    assert '----> 4     return monthly["revenue"] / monthly["units"]' in text
    assert "(1 library frame omitted)" in text and "(4 library frames omitted)" in text
    assert "-> 3812     raise KeyError(key) from err" in text  # where the library raised


def test_snapshot_timeout() -> None:
    traceback = (
        "-" * 75 + "\n"
        "KeyboardInterrupt                         Traceback (most recent call last)\n"
        "Cell In[4], line 3\n      1 total = 0\n      2 for i in range(10**10):\n"
        "----> 3     total += i\n\nKeyboardInterrupt: "
    )
    result = make_result(
        status="timeout",
        stdout="started\n",
        error=ErrorInfo(name="KeyboardInterrupt", value="", traceback=traceback),
        message="the cell ran longer than its 60 s limit and was interrupted; "
        "the kernel and its variables survive",
        execution_count=4,
    )
    text = format_result(result)
    check_snapshot("timeout", text)
    assert "60 s time limit" in text and "split the work" in text


def test_snapshot_oom() -> None:
    result = make_result(
        status="oom",
        message="the sandbox ran out of memory (limit 1024 MiB, policy field memory_mb); "
        "the kernel was killed and its variables are lost",
        kernel_alive=False,
        state_lost=True,
    )
    text = format_result(result)
    check_snapshot("oom", text)
    assert "1024 MiB memory limit" in text and "variables and imports are lost" in text


def test_snapshot_produced_files_and_images() -> None:
    chart = produced("display-5-1.png", "image/png", 20_480, source="display")
    result = make_result(
        status="ok",
        stdout="saved\n",
        displays=[
            DisplayOutput(data={"image/png": PNG_B64, "text/plain": "<Figure size 640x480>"}),
            DisplayOutput(data={"image/svg+xml": "<svg/>"}),
            DisplayOutput(data={"application/vnd.plotly.v1+json": {}}),
        ],
        files=[
            produced("summary.csv", "text/csv", 812),
            produced(
                "report.xlsx",
                "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
                5_500_000,
            ),
            chart,
        ],
        execution_count=5,
    )
    text = format_result(result)
    check_snapshot("files", text)
    assert "[image/png displayed, saved as display-5-1.png]" in text
    assert "[image displayed]" in text  # the svg: no file was stored for it


def test_snapshot_dataframe_repr_is_kept_whole_under_its_shape() -> None:
    result = make_result(
        status="ok",
        displays=[DisplayOutput(data={"text/plain": SMALL_FRAME, "text/html": SMALL_FRAME_HTML})],
        value=DisplayOutput(data={"text/plain": DATAFRAME_100x3, "text/html": DATAFRAME_HTML}),
        execution_count=8,
    )
    text = format_result(result)
    check_snapshot("dataframe", text)
    assert "DataFrame, 100 rows x 3 columns:\n      a    b    c\n0     0    1    2\n" in text
    assert "DataFrame, 2 rows x 2 columns:\n" + SMALL_FRAME in text
    assert text.endswith("\n99  297  298  299")  # pandas' own tail rows: all of its repr
    assert "[100 rows x 3 columns]" not in text  # its footer is the title


def test_a_dataframe_that_fits_is_shown_whole() -> None:
    """The README's task: the month that sold most is the frame's 12th and last row."""
    frame = DisplayOutput(data={"text/plain": MONTHLY_FRAME, "text/html": MONTHLY_FRAME_HTML})
    text = format_result(make_result(status="ok", value=frame, execution_count=1))
    assert text == "Status: ok\n--- Out[1] ---\nDataFrame, 12 rows x 2 columns:\n" + MONTHLY_FRAME


def test_a_dataframe_over_its_share_keeps_head_and_tail_and_counts_the_cut() -> None:
    rows = [f"{i:<5}{i * 7:>8}" for i in range(500)]  # display.max_rows = None: every row
    plain = "     value\n" + "\n".join(rows) + "\n\n[500 rows x 1 columns]"
    frame = DisplayOutput(data={"text/plain": plain})
    text = format_result(
        make_result(status="ok", value=frame, execution_count=2), budget_chars=2000
    )
    assert len(text) <= 2000
    assert text.startswith("Status: ok\n--- Out[2] ---\nDataFrame, 500 rows x 1 columns:\n")
    assert "\n     value\n0           0\n" in text and text.endswith("\n499      3493")
    note = re.search(r"\[\.\.\. ([\d,]+) characters \(([\d,]+) lines\) cut \.\.\.\]", text)
    assert note is not None, text
    kept = [line for line in text.split("\n") if line in rows]
    # every row is either shown or counted as cut
    assert int(note.group(2).replace(",", "")) + len(kept) == len(rows)


# --------------------------------------------------------------------------- format_result


def test_missing_module_hint_names_what_is_available() -> None:
    tb = "Cell In[1], line 1\n----> 1 import sklearn\n\nModuleNotFoundError: No module named 'x'"
    result = make_result(
        status="error",
        error=ErrorInfo(
            name="ModuleNotFoundError", value="No module named 'sklearn'", traceback=tb
        ),
    )
    text = format_result(result, available_modules=["numpy", "scipy"])
    hint = text.splitlines()[-1]
    assert hint.startswith("Hint: 'sklearn' is not installed") and "no internet" in hint
    assert "numpy, scipy" in hint
    default = format_result(result).splitlines()[-1]
    assert "numpy, pandas, matplotlib, openpyxl" in default


def test_name_error_hint_only_after_a_restart() -> None:
    error = ErrorInfo(name="NameError", value="name 'df' is not defined", traceback="")
    fresh = make_result(status="error", error=error)
    assert "Hint" not in format_result(fresh)
    lost = make_result(status="error", error=error, state_lost=True)
    assert "variables and imports defined in earlier cells are gone" in format_result(lost)
    later = format_result(fresh, after_restart=True)
    # An earlier restart, not this cell's: the name may be one it lost, or a typo.
    assert later.splitlines()[-1].startswith("Hint: the kernel was restarted earlier")
    assert "check its spelling" in later


def test_dead_kernel_says_state_is_lost() -> None:
    result = make_result(
        status="dead",
        message="the kernel exited (signal 9)",
        kernel_alive=False,
        state_lost=True,
    )
    text = format_result(result)
    assert text.startswith("Status: dead: the kernel exited (signal 9)")
    assert "Hint: the kernel died, so variables and imports are lost" in text


def test_long_output_keeps_head_and_tail_and_counts_the_cut() -> None:
    stdout = "".join(f"line {i:05d}\n" for i in range(5000))
    text = format_result(make_result(status="ok", stdout=stdout), budget_chars=2000)
    assert len(text) <= 2000
    assert "line 00000" in text and "line 04999" in text
    note = re.search(r"\[\.\.\. ([\d,]+) characters \(([\d,]+) lines\) cut \.\.\.\]", text)
    assert note is not None, text
    cut_chars = int(note.group(1).replace(",", ""))
    kept = [ln for ln in text.split("\n") if ln.startswith("line ")]
    # every line is either shown or counted as cut
    assert cut_chars + sum(len(ln) + 1 for ln in kept) == len(stdout)
    assert int(note.group(2).replace(",", "")) + len(kept) == 5000


def test_engine_cut_is_added_to_the_count_and_the_full_output_file_is_named() -> None:
    head, tail = "FIRST\n" + "a" * 5000 + "\n", "b" * 5000 + "\nLAST\n"
    stdout = head + "\n[... 9000000 bytes cut ...]\n" + tail
    result = make_result(
        status="ok",
        stdout=stdout,
        stdout_truncated=True,
        files=[produced("stdout.txt", "text/plain", 9_010_012)],
    )
    text = format_result(result, budget_chars=1000)
    assert "FIRST" in text and "LAST" in text and len(text) <= 1000
    note = re.search(
        r"\[\.\.\. ([\d,]+) characters \(at least [\d,]+ lines\) cut; (.*) \.\.\.\]", text
    )
    assert note is not None, text
    assert int(note.group(1).replace(",", "")) > 9_000_000
    assert note.group(2) == "the full output is in /mnt/data/stdout.txt"


def test_budget_holds_whatever_the_cell_printed() -> None:
    huge = "y" * 300_000
    tb = "Cell In[1], line 1\n----> 1 boom()\n\n" + "\n".join(["x" * 90] * 3000)
    result = make_result(
        status="error",
        stdout=huge,
        stderr=huge,
        value=DisplayOutput(data={"text/plain": huge}),
        error=ErrorInfo(name="ValueError", value="v" * 5000, traceback=tb),
        files=[produced(f"f{i}.csv", "text/csv", i) for i in range(40)],
        execution_count=1,
    )
    for budget in (300, 600, 2000, 8000, 20000):
        text = format_result(result, budget_chars=budget)
        assert len(text) <= budget, budget
        assert text.startswith("Status: error: ValueError: vvv")
    assert "- ... and 20 more" in format_result(result, budget_chars=20000)


def test_each_part_gets_its_share_and_the_only_cut_note_is_the_true_one() -> None:
    """The parts' titles were counted a character short: over budget by one per part,
    the whole text was cut again, over the real note, which then said 55 characters."""
    stdout = "a" * 500_000 + "\n[... 1951424 bytes cut ...]\n" + "a" * 500_000
    result = make_result(
        status="ok",
        stdout=stdout,
        stdout_truncated=True,
        value=DisplayOutput(data={"text/plain": "3000000"}),
        execution_count=6,
    )
    text = format_result(result, budget_chars=8000)
    assert len(text) <= 8000
    (note,) = re.findall(r"\[\.\.\. ([\d,]+) characters", text)
    assert int(note.replace(",", "")) > 2_900_000
    assert re.findall(r"^--- .* ---$", text, re.M) == ["--- stdout ---", "--- Out[6] ---"]


def test_output_left_out_by_a_cap_is_not_no_output() -> None:
    for left_out in ({"displays_truncated": True}, {"files_truncated": True}):
        text = format_result(make_result(status="ok", **left_out), budget_chars=2000)
        assert text.splitlines()[0] == "Status: ok", left_out


def test_colour_codes_in_the_output_do_not_reach_the_model() -> None:
    result = make_result(
        status="ok", stdout="\x1b[31mred\x1b[0m plain\n", stderr="\x1b[1;33mwarn\x1b[0m\n"
    )
    text = format_result(result)
    assert "\x1b" not in text
    assert "--- stdout ---\nred plain" in text and "--- stderr ---\nwarn" in text


def test_an_exception_group_printed_to_stderr_is_shown_as_its_cleaned_traceback() -> None:
    """IPython prints an ExceptionGroup's traceback to stderr and sends no error message."""
    stderr = (
        "loading\n"
        "  + Exception Group Traceback (most recent call last):\n"
        '  |   File "/opt/venv/lib/python3.12/site-packages/IPython/core/interactiveshell.py", '
        "line 3823, in run_code\n"
        "  |     exec(code_obj, self.user_global_ns, self.user_ns)\n"
        '  |   File "/tmp/ipykernel_41/2569845120.py", line 2, in <module>\n'
        '  |     raise ExceptionGroup("many", [ValueError("a"), KeyError("b")])\n'
        "  | ExceptionGroup: many (2 sub-exceptions)\n"
        "  +-+---------------- 1 ----------------\n"
        "    | ValueError: a\n"
        "    +---------------- 2 ----------------\n"
        "    | KeyError: 'b'\n"
        "    +------------------------------------\n"
    )
    error = ErrorInfo(name="ExceptionGroup", value="many (2 sub-exceptions)", traceback="")
    text = format_result(make_result(status="error", stderr=stderr, error=error))
    assert text == (
        "Status: error: ExceptionGroup: many (2 sub-exceptions)\n"
        "--- stderr ---\n"
        "loading\n"
        "--- traceback ---\n"
        "  + Exception Group Traceback (most recent call last):\n"
        '  |   File "/tmp/ipykernel_41/2569845120.py", line 2, in <module>\n'
        '  |     raise ExceptionGroup("many", [ValueError("a"), KeyError("b")])\n'
        "  | ExceptionGroup: many (2 sub-exceptions)\n"
        "  +-+---------------- 1 ----------------\n"
        "    | ValueError: a\n"
        "    +---------------- 2 ----------------\n"
        "    | KeyError: 'b'\n"
        "    +------------------------------------"
    )
    # An exception raised while a group was handled: the whole chain is the traceback.
    chained = stderr.removeprefix("loading\n") + (
        "\nDuring handling of the above exception, another exception occurred:\n\n"
        "Traceback (most recent call last):\n"
        '  File "/tmp/ipykernel_41/3769694414.py", line 4, in <module>\n'
        '    {}["x"]\n'
        "KeyError: 'x'\n"
    )
    error = ErrorInfo(name="KeyError", value="'x'", traceback="")
    text = format_result(make_result(status="error", stderr=chained, error=error))
    assert "--- stderr ---" not in text and "interactiveshell" not in text
    assert text.startswith(
        "Status: error: KeyError: 'x'\n--- traceback ---\n"
        "  + Exception Group Traceback (most recent call last):\n"
    )
    assert text.endswith(
        "    | KeyError: 'b'\n    +------------------------------------\n\n"
        "During handling of the above exception, another exception occurred:\n\n"
        "Traceback (most recent call last):\n"
        '  File "/tmp/ipykernel_41/3769694414.py", line 4, in <module>\n'
        '    {}["x"]\n'
        "KeyError: 'x'"
    )


def test_the_cut_note_counts_every_line_not_shown_whole() -> None:
    """Three long lines cut in the middle: the first and last in part, all three counted."""
    stdout = "\n".join(letter * 2000 for letter in "abc")
    text = format_result(make_result(status="ok", stdout=stdout), budget_chars=1000)
    shown = re.fullmatch(
        r"Status: ok\n--- stdout ---\n(a+)(\n?)"
        r"\[\.\.\. ([\d,]+) characters \((\d+) lines?\) cut \.\.\.\]\n(c+)",
        text,
    )
    assert shown is not None, text
    head, newline, cut, lines, tail = shown.groups()
    assert int(cut.replace(",", "")) == len(stdout) - len(head) - len(tail)
    assert int(lines) == 3
    assert newline == "\n"  # the note is on a line of its own, not after the cut "aaa"


def test_the_engines_cut_note_is_no_line_and_is_never_cut_in_part() -> None:
    rows = [f"row {i:04d}" for i in range(400)]
    # As the engine keeps a stream over its cap: head, its note, tail.
    stdout = "\n".join(rows[:200]) + "\n\n[... 5000 bytes cut ...]\n" + "\n".join(rows[200:])
    result = make_result(status="ok", stdout=stdout, stdout_truncated=True)
    text = format_result(result, budget_chars=1000)
    note = re.search(r"\[\.\.\. ([\d,]+) characters \(at least ([\d,]+) lines\) cut \.\.\.\]", text)
    assert note is not None, text
    kept = [line for line in text.split("\n") if line in rows]
    # every row is either shown or counted as cut; the engine's note is no row
    assert int(note.group(2)) + len(kept) == len(rows)
    assert int(note.group(1).replace(",", "")) == 5000 + 9 * (len(rows) - len(kept))
    # A cut that falls just after the newline opening the engine's note takes it whole.
    stdout = "a" * 150 + "\n[... 9000000 bytes cut ...]\n" + "b" * 600
    result = make_result(status="ok", stdout=stdout, stdout_truncated=True)
    assert format_result(result, budget_chars=406) == (
        "Status: ok\n--- stdout ---\n"
        + "a" * 150
        + "\n[... 9,000,437 characters (at least 1 line) cut ...]\n"
        + "b" * 163
    )
