"""user_traceback: the user's frames only."""

from __future__ import annotations

from sandkernel.loop import format_result, user_traceback
from sandkernel.results import ErrorInfo
from tests.loop._support import INPUT_IN_KERNEL, make_result


def test_ipykernel_frames_are_dropped_from_an_input_error() -> None:
    text = user_traceback(INPUT_IN_KERNEL)
    assert "ipykernel" not in text and "kernelbase" not in text
    assert text.splitlines()[:3] == [
        "StdinNotImplementedError  Traceback (most recent call last)",
        "Cell In[2], line 1",
        '----> 1 name = input("Your name? ")',
    ]
    result = make_result(
        status="error",
        error=ErrorInfo(name="StdinNotImplementedError", value="...", traceback=INPUT_IN_KERNEL),
    )
    assert "input() cannot work here" in format_result(result)


def test_plain_python_tracebacks_are_filtered_too() -> None:
    tb = (
        "Traceback (most recent call last):\n"
        '  File "/mnt/data/job.py", line 9, in <module>\n    main()\n'
        '  File "/usr/lib/python3/dist-packages/IPython/core/interactiveshell.py", line 1, in x\n'
        "    exec(code)\n"
        '  File "/mnt/data/job.py", line 5, in main\n    json.loads(raw)\n'
        '  File "/usr/lib/python3.12/json/__init__.py", line 346, in loads\n'
        "    return _default_decoder.decode(s)\n"
        '  File "/usr/lib/python3.12/json/decoder.py", line 355, in raw_decode\n'
        '    raise JSONDecodeError("Expecting value", s, err.value) from None\n'
        "json.decoder.JSONDecodeError: Expecting value: line 1 column 1 (char 0)"
    )
    assert user_traceback(tb) == (
        "Traceback (most recent call last):\n"
        '  File "/mnt/data/job.py", line 9, in <module>\n    main()\n'
        '  File "/mnt/data/job.py", line 5, in main\n    json.loads(raw)\n'
        "(1 library frame omitted)\n"
        '  File "json/decoder.py", line 355, in raw_decode\n'
        '    raise JSONDecodeError("Expecting value", s, err.value) from None\n'
        "json.decoder.JSONDecodeError: Expecting value: line 1 column 1 (char 0)"
    )


def test_the_layout_of_a_syntax_error_raised_in_called_code_is_cleaned_too() -> None:
    # As IPython formats it when code a cell called (ast.parse) raised a SyntaxError.
    tb = (
        "Traceback (most recent call last):\n\n"
        "  File /venv/lib/python3.12/site-packages/IPython/core/interactiveshell.py:3823 in "
        "run_code\n    exec(code_obj, self.user_global_ns, self.user_ns)\n\n"
        "  Cell In[1], line 2\n    tree = ast.parse('def f(:\\n    pass')\n\n"
        "  File /usr/lib/python3.12/ast.py:52 in parse\n"
        "    return compile(source, filename, mode, flags,\n\n"
        "  File <unknown>:1\n    def f(:\n          ^\nSyntaxError: invalid syntax\n"
    )
    assert user_traceback(tb) == (
        "Traceback (most recent call last):\n\n"
        "  Cell In[1], line 2\n    tree = ast.parse('def f(:\\n    pass')\n"
        "(1 library frame omitted)\n"
        "  File <unknown>:1\n    def f(:\n          ^\nSyntaxError: invalid syntax"
    )
    # A broken module of the workspace is the user's: shown whole.
    tb = (
        "Traceback (most recent call last):\n\n"
        "  File /venv/lib/python3.12/site-packages/IPython/core/interactiveshell.py:3823 in "
        "run_code\n    exec(code_obj, self.user_global_ns, self.user_ns)\n\n"
        "  Cell In[2], line 3\n    import helpers\n\n"
        "  File /mnt/data/helpers.py:2\n    return 1\n    ^\n"
        "IndentationError: expected an indented block after function definition on line 1\n"
    )
    cleaned = user_traceback(tb)
    assert "interactiveshell" not in cleaned and "/venv/" not in cleaned
    assert "  File /mnt/data/helpers.py:2\n    return 1\n    ^\nIndentationError" in cleaned


def test_deep_recursion_is_shown_once_with_a_count() -> None:
    frame = "Cell In[5], line 1, in r(n)\n----> 1 def r(n): return r(n+1)\n\n"
    tb = (
        "RecursionError                            Traceback (most recent call last)\n"
        "Cell In[5], line 2\n----> 2 r(0)\n\n" + frame * 978 + "RecursionError: maximum recursion"
    )
    text = user_traceback(tb)
    assert text.count("def r(n)") == 1
    assert "[... the frame above repeated 977 more times]" in text


def test_an_exception_message_with_lines_like_frames_is_kept_whole() -> None:
    """After the exception's line, the message: "File a.csv: ..." is no frame to fold."""
    message = (
        "2 files failed validation:\n\nFile a.csv: missing column 'price'\nrow 3: empty\n\n"
        'File b.csv: 4 duplicate ids\n  File "x", line 1\nend'
    )
    tb = (
        "---------------------------------------------------------------------------\n"
        "ValueError                                Traceback (most recent call last)\n"
        "Cell In[5], line 9\n----> 9 raise ValueError(report)\n\n"
        f"ValueError: {message}"
    )
    assert user_traceback(tb).endswith(f"ValueError: {message}")
    # A chained traceback after such a message is cleaned as one again.
    chained = (
        tb + "\n\nDuring handling of the above exception, another exception occurred:\n\n"
        "---------------------------------------------------------------------------\n"
        "KeyError                                  Traceback (most recent call last)\n"
        "Cell In[5], line 11\n----> 11 d['x']\n\n"
        "File /usr/lib/python3.12/site-packages/ipykernel/zmqshell.py:1, in f()\n"
        "----> 1 pass\n\nKeyError: 'x'"
    )
    text = user_traceback(chained)
    assert f"ValueError: {message}" in text and "zmqshell" not in text
    assert text.endswith("----> 11 d['x']\n\nKeyError: 'x'")


def test_mutual_recursion_is_shown_once_with_a_count() -> None:
    """f calls g calls f...: the cycle is shown once, then the frames where it stopped."""
    f = "Cell In[3], line 1, in f(n)\n----> 1 def f(n): return g(n)\n\n"
    g = "Cell In[3], line 2, in g(n)\n----> 2 def g(n): return f(n)\n\n"
    tb = (
        "RecursionError                            Traceback (most recent call last)\n"
        "Cell In[3], line 3\n----> 3 f(0)\n\n"
        + (f + g) * 489
        + f
        + "RecursionError: maximum recursion depth exceeded"
    )
    assert user_traceback(tb) == (
        "RecursionError  Traceback (most recent call last)\n"
        "Cell In[3], line 3\n----> 3 f(0)\n\n"
        "Cell In[3], line 1, in f(n)\n----> 1 def f(n): return g(n)\n\n"
        "Cell In[3], line 2, in g(n)\n----> 2 def g(n): return f(n)\n"
        "[... the 2 frames above repeated 488 more times]\n\n"
        "Cell In[3], line 1, in f(n)\n----> 1 def f(n): return g(n)\n\n"
        "RecursionError: maximum recursion depth exceeded"
    )


def test_recursion_through_a_library_is_folded_and_keeps_where_it_was_raised() -> None:
    walk = (
        '  File "/mnt/data/walk.py", line 5, in walk\n    return json.dumps(node, default=walk)\n'
    )
    dumps = (
        '  File "/usr/lib/python3.12/json/__init__.py", line 238, in dumps\n    **kw).encode(obj)\n'
    )
    encode = (
        '  File "/usr/lib/python3.12/json/encoder.py", line 200, in encode\n'
        "    chunks = self.iterencode(o, _one_shot=True)\n"
    )
    iterencode = (
        '  File "/usr/lib/python3.12/json/encoder.py", line 258, in iterencode\n'
        "    return _iterencode(o, 0)\n"
    )
    tb = (
        "Traceback (most recent call last):\n"
        '  File "/mnt/data/walk.py", line 9, in <module>\n    walk(tree)\n'
        + (walk + dumps + encode + iterencode) * 300
        + walk
        + dumps
        + encode
        + "RecursionError: maximum recursion depth exceeded while calling a Python object"
    )
    assert user_traceback(tb) == (
        "Traceback (most recent call last):\n"
        '  File "/mnt/data/walk.py", line 9, in <module>\n    walk(tree)\n'
        + walk
        + "(3 library frames omitted)\n"
        "[... the 4 frames above repeated 299 more times]\n" + walk + "(1 library frame omitted)\n"
        '  File "json/encoder.py", line 200, in encode\n'
        "    chunks = self.iterencode(o, _one_shot=True)\n"
        "RecursionError: maximum recursion depth exceeded while calling a Python object"
    )


def test_an_exception_group_is_cleaned_exception_by_exception_in_its_boxes() -> None:
    # As IPython prints an asyncio.TaskGroup's failure (to stderr, in Python's own layout).
    site = "/opt/venv/lib/python3.12/site-packages"
    tb = (
        "  + Exception Group Traceback (most recent call last):\n"
        f'  |   File "{site}/IPython/core/interactiveshell.py", line 3821, in run_code\n'
        "  |     await eval(code_obj, self.user_global_ns, self.user_ns)\n"
        '  |   File "/tmp/ipykernel_41/3246862829.py", line 8, in <module>\n'
        "  |     await main()\n"
        '  |   File "/tmp/ipykernel_41/3246862829.py", line 5, in main\n'
        "  |     async with asyncio.TaskGroup() as tg:\n"
        '  |   File "/usr/lib/python3.12/asyncio/taskgroups.py", line 145, in __aexit__\n'
        "  |     raise me from None\n"
        "  | ExceptionGroup: unhandled errors in a TaskGroup (2 sub-exceptions)\n"
        "  +-+---------------- 1 ----------------\n"
        "    | Traceback (most recent call last):\n"
        '    |   File "/tmp/ipykernel_41/3246862829.py", line 3, in load\n'
        "    |     return json.loads(x)\n"
        "    |            ^^^^^^^^^^^^^\n"
        '    |   File "/usr/lib/python3.12/json/__init__.py", line 346, in loads\n'
        "    |     return _default_decoder.decode(s)\n"
        "    |            ^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
        '    |   File "/usr/lib/python3.12/json/decoder.py", line 355, in raw_decode\n'
        '    |     raise JSONDecodeError("Expecting value", s, err.value) from None\n'
        "    | json.decoder.JSONDecodeError: Expecting value: line 1 column 1 (char 0)\n"
        "    +---------------- 2 ----------------\n"
        "    | ExceptionGroup: nested (2 sub-exceptions)\n"
        "    +-+---------------- 1 ----------------\n"
        "      | KeyError: 'b'\n"
        "      +---------------- 2 ----------------\n"
        "      | TypeError: two\n"
        "      | lines\n"
        "      +------------------------------------\n"
    )
    assert user_traceback(tb) == (
        "  + Exception Group Traceback (most recent call last):\n"
        '  |   File "/tmp/ipykernel_41/3246862829.py", line 8, in <module>\n'
        "  |     await main()\n"
        '  |   File "/tmp/ipykernel_41/3246862829.py", line 5, in main\n'
        "  |     async with asyncio.TaskGroup() as tg:\n"
        '  |   File "asyncio/taskgroups.py", line 145, in __aexit__\n'
        "  |     raise me from None\n"
        "  | ExceptionGroup: unhandled errors in a TaskGroup (2 sub-exceptions)\n"
        "  +-+---------------- 1 ----------------\n"
        "    | Traceback (most recent call last):\n"
        '    |   File "/tmp/ipykernel_41/3246862829.py", line 3, in load\n'
        "    |     return json.loads(x)\n"
        "    |            ^^^^^^^^^^^^^\n"
        "    | (1 library frame omitted)\n"
        '    |   File "json/decoder.py", line 355, in raw_decode\n'
        '    |     raise JSONDecodeError("Expecting value", s, err.value) from None\n'
        "    | json.decoder.JSONDecodeError: Expecting value: line 1 column 1 (char 0)\n"
        "    +---------------- 2 ----------------\n"
        "    | ExceptionGroup: nested (2 sub-exceptions)\n"
        "    +-+---------------- 1 ----------------\n"
        "      | KeyError: 'b'\n"
        "      +---------------- 2 ----------------\n"
        "      | TypeError: two\n"
        "      | lines\n"
        "      +------------------------------------"
    )
