"""The `sandkernel` command, run as a user would run it."""

from __future__ import annotations

import argparse
import json
import os
import pty
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandkernel.cli import _COMMANDS, build_parser
from sandkernel.files import FileStore
from sandkernel.sandbox import CgroupLayout
from sandkernel.sandbox.host import default_runtime_root

SANDKERNEL = [sys.executable, "-m", "sandkernel.cli"]


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SANDKERNEL, *args], input=stdin, capture_output=True, text=True, timeout=120
    )


@pytest.mark.sandbox
def test_run_json_prints_ok_and_stdout() -> None:
    proc = run_cli("run", "--json", "print(1+1)")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "ok" and result["stdout"] == "2\n"


@pytest.mark.sandbox
def test_run_reads_stdin_and_reports_errors_with_exit_1() -> None:
    proc = run_cli("run", stdin="print('piped')\n")
    assert proc.returncode == 0 and proc.stdout == "piped\n"
    proc = run_cli("run", "raise ValueError('bad input')")
    assert proc.returncode == 1
    assert "[error] ValueError: bad input" in proc.stderr


@pytest.mark.sandbox
def test_run_with_workspace_keeps_files_and_saves_displays(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    code = (
        "open('out.txt', 'w').write('hello')\n"
        "import matplotlib.pyplot as plt\nplt.plot([1, 2]); plt.show()"
    )
    proc = run_cli("run", "--workspace", str(ws), code)
    assert proc.returncode == 0, proc.stderr
    assert (ws / "out.txt").read_text() == "hello"
    pngs = list(ws.glob("display-*.png"))
    assert pngs and pngs[0].read_bytes().startswith(b"\x89PNG")


@pytest.mark.sandbox
def test_doctor_with_ray_refuses_the_options_it_would_not_use(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("sk-test")
    for extra in (
        ["--attack"],
        ["--policy", "strict"],
        ["--model-url", "http://127.0.0.1:9"],
        ["--model-key-file", str(key)],
    ):
        proc = run_cli("doctor", "--ray", "127.0.0.1:1", *extra)
        assert proc.returncode == 2, proc.stderr
        assert f"{extra[0]}: for this machine only, not with --ray" in proc.stderr


def test_doctor_exits_0_and_lists_each_control() -> None:
    proc = run_cli("doctor", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    names = {c["name"] for c in report["checks"] if c["ok"]}
    controls = ["net namespace", "pid namespace", "seccomp", "no_new_privs", "capabilities"]
    controls += ["memory limit", "pids limit", "cpu quota", "network", "host files"]
    assert set(controls) <= names
    assert report["ok"] is True


@pytest.mark.sandbox
def test_doctor_checks_the_policy_it_is_given_and_its_cold_start(tmp_path: Path) -> None:
    cold = tmp_path / "cold-start.toml"
    # PYTHONHASHSEED is read only as an interpreter starts: no kernel can be forked for it.
    cold.write_text('memory_mb = 256\n[env]\nPYTHONHASHSEED = "0"\n')
    proc = run_cli("doctor", "--json", "--policy", str(cold))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["policy"] == "cold-start" and report["ok"] is True
    assert checks["memory limit"]["detail"].endswith(f"(policy: {256 << 20})")
    start = checks["kernel start path"]
    assert start["ok"] and start["detail"].startswith("in force: cold start (policy cold-start:")
    assert "PYTHONHASHSEED" in start["detail"]
    human = run_cli("doctor", "--policy", str(cold))
    assert human.stdout.startswith("sandkernel doctor (policy cold-start)\n"), human.stderr


@pytest.mark.sandbox
def test_doctor_checks_the_default_policy_unless_told() -> None:
    proc = run_cli("doctor", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["policy"] == "default"
    assert checks["memory limit"]["detail"].endswith(f"(policy: {1024 << 20})")
    start = checks["kernel start path"]["detail"]
    assert start.startswith("in force: ") and "EngineConfig.zygote" in start


def test_doctor_refuses_a_policy_it_cannot_load_and_attacks_on_another_policy() -> None:
    unknown = run_cli("doctor", "--policy", "no-such-policy")
    assert unknown.returncode == 2 and "unknown policy 'no-such-policy'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    attack = run_cli("doctor", "--attack", "--policy", "strict")
    assert attack.returncode == 2, attack.stderr
    assert "--attack: tries the default policy, not with --policy" in attack.stderr


def test_policy_show_prints_the_rendered_config() -> None:
    proc = run_cli("policy", "show", "strict")
    assert proc.returncode == 0, proc.stderr
    assert "memory_mb = 512" in proc.stdout
    assert 'hostname: "sandbox"' in proc.stdout and "seccomp_string" in proc.stdout


def test_bad_policy_is_a_clear_error_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("cpus = 0\n")
    proc = run_cli("policy", "show", str(bad))
    assert proc.returncode == 2
    assert "cpus" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.sandbox
def test_a_display_is_never_saved_through_a_link_the_sandbox_planted(tmp_path: Path) -> None:
    ws, outside = tmp_path / "ws", tmp_path / "outside"
    ws.mkdir()
    (tmp_path / "ws-link").symlink_to(ws)  # the user's own link to it is followed
    code = (
        "import base64, os\nfrom IPython.display import display\n"
        f"os.symlink({str(outside)!r}, 'display-1-1.png')\n"
        "for data in (b'from the sandbox', b'a plain display'):\n"
        "    display({'image/png': base64.b64encode(data).decode()}, raw=True)"
    )
    proc = run_cli("run", "--workspace", str(tmp_path / "ws-link"), code)
    assert not outside.exists()  # the command may run as root: nothing written outside
    assert (ws / "display-1-1.png").is_symlink()
    assert "[display 1: image/png not saved as display-1-1.png:" in proc.stderr
    assert (ws / "display-1-2.png").read_bytes() == b"a plain display"  # the next one is


@pytest.mark.sandbox
def test_run_lists_produced_files_and_files_get_downloads_them(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    proc = run_cli("run", "--json", "--store", store, "open('r.csv', 'w').write('a,b\\n1,2\\n')")
    assert proc.returncode == 0, proc.stderr
    (produced,) = json.loads(proc.stdout)["files"]
    assert produced["name"] == "r.csv" and produced["mime_type"] == "application/csv"
    human = run_cli("run", "--store", store, "open('s.txt', 'w').write('x')")
    assert "[file] /mnt/data/s.txt  text/plain, 1 bytes  id=file-" in human.stdout
    target = tmp_path / "downloaded.csv"
    got = run_cli("files", "--store", store, "get", produced["id"], "-o", str(target))
    assert got.returncode == 0, got.stderr
    assert target.read_text() == "a,b\n1,2\n"
    listing = run_cli("files", "--store", store, "list")
    assert produced["id"] in listing.stdout and "s.txt" in listing.stdout


@pytest.mark.sandbox
def test_files_get_by_the_files_own_name_never_replaces_a_file(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    proc = run_cli("run", "--json", "--store", store, "open('.bashrc', 'w').write('evil')")
    (produced,) = json.loads(proc.stdout)["files"]
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("mine")
    get = [*SANDKERNEL, "files", "--store", store, "get", produced["id"]]
    refused = subprocess.run(get, cwd=home, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "already exists: give -o" in refused.stderr
    assert (home / ".bashrc").read_text() == "mine"
    into_folder = subprocess.run([*get, "-o", str(home)], capture_output=True, text=True)
    assert into_folder.returncode == 2 and (home / ".bashrc").read_text() == "mine"
    named = subprocess.run([*get, "-o", str(home / ".bashrc")], capture_output=True, text=True)
    assert named.returncode == 0 and (home / ".bashrc").read_text() == "evil"  # asked for


@pytest.mark.sandbox
def test_files_get_takes_no_name_an_upload_could_not_have(tmp_path: Path) -> None:
    """A terminal's escape sequence (or a folder's separator) in a name from the sandbox."""
    store = str(tmp_path / "store")
    code = "open('\\x1b]0;owned\\x07.txt', 'w').write('x'); open('a\\\\b.txt', 'w').write('y')"
    proc = run_cli("run", "--json", "--store", store, code)
    assert proc.returncode == 0, proc.stderr
    produced = {f["name"]: f["id"] for f in json.loads(proc.stdout)["files"]}
    # Listed printable, their backslashes doubled: still not names to write by.
    assert set(produced) == {"\\u001b]0;owned\\u0007.txt", "a\\\\b.txt"}
    here = tmp_path / "here"
    here.mkdir()
    for name, file_id in produced.items():
        get = [*SANDKERNEL, "files", "--store", store, "get", file_id]
        refused = subprocess.run(get, cwd=here, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and "is not a plain file name: give -o" in refused.stderr
        assert list(here.iterdir()) == []
        named = subprocess.run([*get, "-o", str(here / "ok.txt")], capture_output=True, text=True)
        assert named.returncode == 0, named.stderr
        assert (here / "ok.txt").read_text() == ("x" if "owned" in name else "y")
        (here / "ok.txt").unlink()


@pytest.mark.sandbox
def test_run_uploads_inputs_first(tmp_path: Path) -> None:
    data = tmp_path / "in.csv"
    data.write_text("x,y\n3,4\n")
    proc = run_cli(
        "run",
        "--store",
        str(tmp_path / "s"),
        "-i",
        str(data),
        "print(open('in.csv').read(), end='')",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("x,y\n3,4\n")


@pytest.mark.sandbox
def test_run_once_is_a_program_with_our_stdin_its_argv_and_its_exit_status() -> None:
    code = "import sys\nprint(sys.argv[1:], sys.stdin.read().upper())\nsys.exit(4)"
    proc = run_cli("run", "--once", "--arg", "a", "--arg", "b", code, stdin="piped")
    assert (proc.returncode, proc.stdout) == (4, "['a', 'b'] PIPED\n"), proc.stderr
    proc = run_cli("run", "--once", "--json", "--timeout", "1", "while True: pass")
    assert proc.returncode == 124
    assert json.loads(proc.stdout)["status"] == "timeout"
    proc = run_cli("run", "--once", stdin="print(1)")
    assert proc.returncode != 0 and "standard input is the program's" in proc.stderr


@pytest.mark.sandbox
@pytest.mark.parametrize("signum", [signal.SIGSEGV, signal.SIGTERM, signal.SIGABRT])
def test_run_once_killed_by_a_signal_exits_as_a_shell_reports_it(signum: int) -> None:
    proc = run_cli("run", "--once", f"import os\nos.kill(os.getpid(), {int(signum)})")
    assert proc.returncode == 128 + signum, proc.stderr  # 139, 143, 134, as `python prog.py`


@pytest.mark.sandbox
def test_run_once_with_an_anti_exit_header_exits_as_the_program() -> None:
    header = "exit = None\nimport os, sys\nos._exit = None\nsys.exit = None\n"
    proc = run_cli("run", "--once", header + "print('hello')")
    assert (proc.returncode, proc.stdout) == (0, "hello\n"), proc.stderr
    proc = run_cli("run", "--once", header + "assert False")
    assert proc.returncode == 1 and "AssertionError" in proc.stderr


@pytest.mark.sandbox
def test_run_once_dash_reads_the_program_from_stdin_as_python_dash_does() -> None:
    code = "import sys\nprint(repr(sys.stdin.read()), sys.argv[1:])\nsys.exit(3)"
    proc = run_cli("run", "--once", "--arg", "x", "-", stdin=code)
    assert (proc.returncode, proc.stdout) == (3, "'' ['x']\n"), proc.stderr


def test_run_help_gives_the_exit_statuses() -> None:
    proc = run_cli("run", "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "exit status: 0 when the code ran without an error" in text
    assert "With --once, the program's own exit status; 124 when it timed out" in text
    assert "128+N when killed by signal N" in text
    assert "Stopped by SIGTERM or SIGHUP, it removes its sandbox first and exits 128+N" in text


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--once", "--workspace", "{tmp}", "1"], "argument --workspace: not allowed with --once"),
        (["--once", "--store", "{tmp}", "1"], "argument --store: not allowed with --once"),
        (["--arg", "X", "1"], "argument --arg: needs --once"),
        (["-f", "{tmp}/prog.py", "print('from arg')"], "argument -f/--file: not allowed with CODE"),
        (["--once", "--socket", "{tmp}/s", "--policy", "strict", "1"],
         "argument --policy: not allowed with --socket"),
        (["--socket", "{tmp}/s", "--store", "{tmp}", "--workspace", "{tmp}", "1"],
         "argument --workspace, --store: not allowed with --socket"),
        (["--once"], "--once: give the program as an argument, '-' (read from stdin) or --file"),
    ],
)  # fmt: skip
def test_run_options_that_conflict_are_refused_with_runs_usage(
    tmp_path: Path, args: list[str], why: str
) -> None:
    (tmp_path / "prog.py").write_text("print('from file')\n")
    proc = run_cli("run", *(a.replace("{tmp}", str(tmp_path)) for a in args), stdin="print(1)")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("usage: sandkernel run "), proc.stderr
    assert f"sandkernel run: error: {why}" in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_files_takes_store_before_or_after_its_subcommand(tmp_path: Path) -> None:
    parser = build_parser("files")
    for args, store in [
        (["files", "--store", "a", "list"], "a"),
        (["files", "list", "--store", "b"], "b"),
        (["files", "get", "file-1", "--store", "c", "-o", "out"], "c"),
        (["files", "--store", "a", "info", "--store", "d", "file-1"], "d"),
        (["files", "--store", "a", "info", "file-1"], "a"),
        (["files", "list"], None),
    ]:
        assert parser.parse_args(args).store == store, args
    missing = tmp_path / "no-store"
    proc = run_cli("files", "list", "--store", str(missing))
    assert proc.returncode == 2 and f"no file store at {missing}" in proc.stderr, proc.stderr


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_a_command_gets_the_same_parser_built_alone() -> None:
    everything = _subcommands(build_parser())
    assert set(everything) == {name for names, _ in _COMMANDS for name in names}
    for name, full in everything.items():
        alone = _subcommands(build_parser(name))
        assert name in alone and len(alone) <= 2  # the daemon's set-up adds serve and mcp
        assert alone[name].format_help() == full.format_help()
    # anything that is not a command (an option, a typo, nothing) lists them all
    for first in ("--help", "evl", None):
        assert set(_subcommands(build_parser(first))) == set(everything)


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["run", "--timeout", "inf", "1"], "must be above 0 and at most 86400"),
        (["run", "--timeout", "0", "1"], "must be above 0"),
        (["run", "--timeout", "nan", "1"], "must be above 0"),
        (["solve", "--timeout", "-5", "q"], "must be above 0"),
        (["eval", "--workers", "0", "--samples", "s.jsonl"], "must be above 0"),
        (["serve", "--max-queued-mb", "nan"], "must be above 0"),
        (["serve", "--max-upload-mb", "-1"], "must be above 0"),
        (["serve", "--session-ttl", "inf"], "at most 2592000"),
        (["serve", "--max-queued-mb", "1e306"], "at most 1048576"),
        (["serve", "--log-level", "verbose"], "invalid choice: 'verbose'"),
        (["serve", "--graceful-timeout", "-5"], "must be at least 0"),
        (["serve", "--pool-size", "two"], "not 'int': 'two'"),
    ],
)
def test_out_of_range_numbers_are_refused_before_anything_starts(args: list[str], why: str) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 2 and why in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_unknown_command_is_refused_with_every_command_listed() -> None:
    proc = run_cli("evl")
    assert proc.returncode == 2
    assert "invalid choice: 'evl'" in proc.stderr
    assert all(name in proc.stderr for name in ("eval", "serve", "run", "policy"))


@pytest.mark.sandbox
def test_paths_that_cannot_be_used_are_refused_with_a_message_not_a_traceback(
    tmp_path: Path,
) -> None:
    latin1 = tmp_path / "latin1.py"
    latin1.write_bytes(b'print("caf\xe9")\n')
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    twin = tmp_path / "elsewhere" / "a-file"  # one /mnt/data: the second would replace it
    twin.parent.mkdir()
    twin.write_text("y")
    missing = tmp_path / "missing"
    problems = tmp_path / "problems.jsonl"
    problems.write_text('{"task_id": "t/0", "prompt": "", "test": "", "entry_point": "f"}\n')
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"task_id": "t/0", "completion": "pass"}\n')
    for args, code, why in [
        (["run", "-f", str(missing)], 2, f"cannot read --file {missing}: No such file"),
        (["run", "-f", str(latin1)], 2, f"cannot read --file {latin1}: it is not UTF-8 text"),
        (["run", "--once", "-i", str(missing), "1"], 2, f"cannot read --input {missing}"),
        (["run", "--workspace", str(a_file), "1"], 2, f"the workspace {a_file} is not a folder"),
        (["doctor", "--model-key-file", str(missing)], 2, "cannot read --model-key-file"),
        (["serve", "--token-file", str(missing)], 2, f"cannot read --token-file {missing}"),
        (["solve", "q", "--model", "m", "--out", str(a_file)], 2, "is not a folder"),
        (["solve", "q", "--model", "m", "--file", str(a_file), "--file", str(twin)], 2,
         "two files named a-file"),
        (["eval", "--problems", str(problems), "--samples", str(samples), "--no-progress",
          "--workers", "1", "--out", str(missing / "r.jsonl")], 2, f"{missing} is not a folder"),
        (["eval", "--samples", str(samples), "--memory-mb", "8"], 2, "must be at least 16"),
    ]:  # fmt: skip
        proc = run_cli(*args)
        assert (proc.returncode, "Traceback" in proc.stderr) == (code, False), (args, proc.stderr)
        assert why in proc.stderr, (args, proc.stderr)


def test_files_list_on_a_store_that_is_not_there_says_so_and_makes_none(tmp_path: Path) -> None:
    missing = tmp_path / "no-store"
    proc = run_cli("files", "--store", str(missing), "list")
    assert proc.returncode == 2 and f"no file store at {missing}" in proc.stderr, proc.stderr
    assert not missing.exists()


def test_files_list_on_a_folder_that_holds_no_store_makes_none_there(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "mine.txt").write_text("mine")
    proc = run_cli("files", "--store", str(folder), "list")
    assert proc.returncode == 2 and f"no file store at {folder}" in proc.stderr, proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["mine.txt"]


def test_a_store_path_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("a file, not a folder")
    proc = run_cli("run", "--store", str(taken), "1")
    assert (proc.returncode, "Traceback" in proc.stderr) == (2, False), proc.stderr
    assert f"cannot open a file store at {str(taken)!r}" in proc.stderr


def _processes_with(marker: str) -> list[int]:
    """The processes on this machine whose command line holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue  # it ended meanwhile
    return found


def _sandboxes_of(pid: int) -> list[Path]:
    """The run folders and cgroups on this machine of the sandboxes process ``pid`` made."""
    places = [default_runtime_root(), *CgroupLayout.detect().parent_dirs()]
    return [path for place in places for path in place.glob(f"{pid}-*")]


@pytest.mark.sandbox
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("once", [False, True], ids=["cell", "once"])
def test_run_stopped_by_sigterm_or_sighup_mid_run_leaves_nothing_and_exits_128_plus_the_signal(
    once: bool, signum: signal.Signals
) -> None:
    tag = secrets.token_hex(6)
    marker = f"sandkernel-test-{tag}"
    # A process in the sandbox with the marker in its command line (and not in ours).
    code = (
        "import subprocess, sys\n"
        f"subprocess.run([sys.executable, '-c', 'import time; time.sleep(120)', "
        f"'sandkernel-test-' + {tag!r}])"
    )
    argv = [*SANDKERNEL, "run", *(["--once"] if once else []), code]
    with subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            deadline = time.monotonic() + 60
            while not _processes_with(marker):
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the code did not start within 60 s"
                time.sleep(0.05)  # polled: a process of another's sandbox, bounded by the deadline
            assert _sandboxes_of(proc.pid)
            proc.send_signal(signum)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 128 + signum, err
    assert err.splitlines()[-1] == (
        f"sandkernel run: stopped by {signum.name}; its sandbox is removed"
    )
    assert _sandboxes_of(proc.pid) == [] and _processes_with(marker) == []


@pytest.mark.sandbox
def test_run_once_whose_files_cannot_be_written_says_why_and_exits_2(tmp_path: Path) -> None:
    policy = tmp_path / "small-files.toml"
    policy.write_text("file_size_mb = 1\n")
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * (2 << 20))
    argv = ["run", "--once", "--policy", str(policy), "-i", str(big), "print('ran')"]
    proc = run_cli(*argv)
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
    assert proc.stderr == "[error] the run's files could not be written: File too large\n"
    as_json = run_cli(*argv, "--json")
    assert as_json.returncode == 2, as_json.stderr
    result = json.loads(as_json.stdout)
    assert (result["status"], result["return_code"]) == ("error", None)
    assert result["message"] == "the run's files could not be written: File too large"


def test_files_get_into_a_folder_that_is_not_there_says_so_in_one_line(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with FileStore(store) as files:
        stored = files.add_bytes(b"a,b\n", "r.csv", agent_id="agent-1")
    target = tmp_path / "missing" / "dir" / "r.csv"
    proc = run_cli("files", "--store", str(store), "get", stored.id, "-o", str(target))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"sandkernel: cannot write {target}: No such file or directory\n"
    assert not (tmp_path / "missing").exists()


def test_files_get_of_a_stored_copy_damaged_in_place_says_so_and_leaves_no_file(
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    data = b"0123456789\n" * 300_000  # several reads
    with FileStore(store) as files:
        stored = files.add_bytes(data, "rows.txt", agent_id="agent-1")
        with files.blob_path(stored.id).open("r+b") as blob:  # same size, other bytes
            blob.seek(len(data) - 3)
            blob.write(b"X")
    target = tmp_path / "rows.txt"
    proc = run_cli("files", "--store", str(store), "get", stored.id, "-o", str(target))
    assert proc.returncode != 0
    assert f"the stored copy of {stored.id!r}" in proc.stderr
    assert "is damaged: other bytes" in proc.stderr and "upload the file again" in proc.stderr
    assert not target.exists()
    # -o naming a link: what it names was written, the link is not removed.
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real.txt")
    proc = run_cli("files", "--store", str(store), "get", stored.id, "-o", str(link))
    assert proc.returncode != 0 and "is damaged" in proc.stderr
    assert link.is_symlink()


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["serve", "--tcp", "99999", "--token", "x"],
         "argument --tcp: the port must be 0-65535 (got '99999')"),
        (["serve", "--tcp", ":abc", "--token", "x"], "argument --tcp: expected [HOST:]PORT"),
        (["serve", "--token-file", "{tmp}/missing"],
         "sandkernel: cannot read --token-file {tmp}/missing: No such file or directory\n"),
        (["mcp", "--upload-dir", "{tmp}/missing"],
         "sandkernel: --upload-dir {tmp}/missing: not a folder\n"),
        (["mcp", "--socket", "{tmp}/d.sock", "--pool-size", "3"],
         "sandkernel: --pool-size would be ignored with --socket: the daemon's engine has "
         "its own settings\n"),
        (["solve", "x", "--model", "m", "--file", "{tmp}/missing.csv"],
         "sandkernel: --file: no such file: {tmp}/missing.csv\n"),
        (["solve", "x", "--model", "m", "--out", "{tmp}/a-file"],
         "sandkernel: --out {tmp}/a-file is not a folder\n"),
        (["demo", "--out", "{tmp}/a-file"], "sandkernel: --out {tmp}/a-file is not a folder\n"),
    ],
)  # fmt: skip
def test_options_that_cannot_be_used_exit_2_with_one_line_saying_why(
    tmp_path: Path, args: list[str], why: str
) -> None:
    (tmp_path / "a-file").write_text("a file, not a folder")
    proc = run_cli(*(a.replace("{tmp}", str(tmp_path)) for a in args))
    why = why.replace("{tmp}", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    if why.endswith("\n"):
        assert proc.stderr == why  # the whole of it
    else:
        assert proc.stderr.startswith(f"usage: sandkernel {args[0]} ")  # argparse's own
        assert f"sandkernel {args[0]}: error: {why}" in proc.stderr, proc.stderr


def test_run_with_no_code_on_a_terminal_is_a_usage_error() -> None:
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run(
            [*SANDKERNEL, "run"], stdin=terminal, capture_output=True, text=True, timeout=60
        )
    finally:
        os.close(controller)
        os.close(terminal)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("usage: sandkernel run ")
    assert "sandkernel run: error: give code as an argument, --file FILE, or on stdin" in (
        proc.stderr
    )


@pytest.mark.sandbox
def test_run_with_an_empty_store_uses_the_default_one_not_the_current_folder(
    tmp_path: Path,
) -> None:
    proc = subprocess.run(
        [*SANDKERNEL, "run", "--store", "", "print(1)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (proc.returncode, proc.stdout) == (0, "1\n"), proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_run_given_a_scripts_path_as_code_says_to_use_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "script.py"
    script.write_text("print('hi')\n")
    monkeypatch.chdir(tmp_path)
    for given in ("script.py", str(script)):
        proc = run_cli("run", given)
        assert proc.returncode == 2, proc.stderr
        assert f"{given!r} is a file: run it with --file {given}" in proc.stderr, proc.stderr


def test_only_an_existing_files_path_is_taken_for_a_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sandkernel.cli import _names_a_script

    (tmp_path / "script.py").write_text("")
    (tmp_path / "print").write_text("")
    monkeypatch.chdir(tmp_path)
    assert _names_a_script("script.py") and _names_a_script("./print")
    # Code that happens to name a file without looking like a path, or no file at all.
    for code in ("print", "missing.py", "script.py\n", "a\0.py", "x" * 5000 + ".py"):
        assert not _names_a_script(code), code
