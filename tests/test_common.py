"""common.py: the one JSONL rule, atomic writes, the one-line error and Ctrl-C wrapper, help defaults."""
import argparse
import json
import os
import stat

import pytest

import common


def test_a_torn_last_line_of_ours_is_warned_about_skipped_and_completed_by_the_next_append(tmp_path, capsys):
    f = tmp_path / "r.jsonl"
    f.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3, "b"')  # killed while writing the third row
    assert common.read_jsonl(str(f)) == [(1, {"a": 1}), (3, {"a": 2})]
    assert capsys.readouterr().err == (f"warning: {f}:4: skipping a torn last line (12 bytes) left by an interrupted run; "
                                       "rerunning completes it\n")
    with common.open_append(str(f)) as out:  # the torn bytes go; the next row starts on its own line
        common.append_jsonl(out, {"a": 3})
    assert [r for _, r in common.read_jsonl(str(f))] == [{"a": 1}, {"a": 2}, {"a": 3}]
    f.write_text('{"a": 1}\n{"a": 2}')  # a whole last row without its newline is kept
    with common.open_append(str(f)) as out:
        common.append_jsonl(out, {"a": 3})
    assert f.read_text() == '{"a": 1}\n{"a": 2}\n{"a": 3}\n'


@pytest.mark.parametrize("text, ours, line", [('{"a": 1}\nnot json\n{"a": 2}\n', True, 2),  # a bad middle line
                                              ('{"a": 1}\n{"a": 2', False, 2),  # a user's file: no torn-line grace
                                              ('{"a": 1}\n[1, 2]\n', True, 2)])  # not an object
def test_any_other_bad_line_is_an_error_naming_file_and_line(tmp_path, text, ours, line):
    f = tmp_path / "x.jsonl"
    f.write_text(text)
    with pytest.raises(ValueError, match=f"^{f}:{line}: "):
        common.read_jsonl(str(f), ours=ours)


def test_atomic_write_leaves_a_readable_file_and_no_temporary(tmp_path):
    common.write_json(str(tmp_path / "d" / "x.json"), {"a": [1, 2]})
    assert json.load(open(tmp_path / "d" / "x.json")) == {"a": [1, 2]} and os.listdir(tmp_path / "d") == ["x.json"]
    assert stat.S_IMODE(os.stat(tmp_path / "d" / "x.json").st_mode) & 0o044 == 0o044
    with pytest.raises(ZeroDivisionError):
        common.atomic_write(str(tmp_path / "d" / "x.json"), lambda p: open(p, "w").write(str(1 / 0)))
    assert json.load(open(tmp_path / "d" / "x.json")) == {"a": [1, 2]} and os.listdir(tmp_path / "d") == ["x.json"]


def test_run_main_prints_one_line_for_bad_input_and_for_ctrl_c(capsys):
    def bad():
        raise ValueError("--n 0: must be >= 1")

    def interrupted():
        raise KeyboardInterrupt
    def missing():
        open("/nonexistent/x.jsonl")

    def hinted():  # a main that knows the real command to resume with
        raise KeyboardInterrupt("python x.py --resume --out out/r goes on from step 5")
    for main, code, want in ((bad, 2, "x.py: error: --n 0: must be >= 1"),
                             (missing, 2, "x.py: error: /nonexistent/x.jsonl: no such file or directory"),
                             (interrupted, 130, "x.py: interrupted; finished work is kept, and rerunning the "
                                                "same command resumes"),
                             (hinted, 130, "x.py: interrupted; finished work is kept, and python x.py "
                                           "--resume --out out/r goes on from step 5")):
        with pytest.raises(SystemExit) as e:
            common.run_main("x.py", main)
        assert e.value.code == code and capsys.readouterr().err.strip().splitlines() == [want]


def test_help_shows_each_default_once():
    p = argparse.ArgumentParser(formatter_class=common.HelpFormatter)
    p.add_argument("--out", default=None, help="where (default: beside the input)")
    p.add_argument("--truncate", action="store_true", help="cut long rows (default: skip them)")
    p.add_argument("--n", type=int, default=0, help="how many")
    text = " ".join(p.format_help().split())
    assert "(default: beside the input)" in text and "(default: None)" not in text
    assert "(default: skip them)" in text and "(default: False)" not in text and "how many (default: 0)" in text


@pytest.mark.parametrize("script, argv", [
    ("sample", ["--n", "0"]), ("sample", ["--batch-size", "-1"]), ("sample", ["--max-new-tokens", "0"]),
    ("directions", ["direction", "--min-per-set", "0"]), ("directions", ["sweep", "--n", "0"]),
    ("directions", ["probe", "--runs", "0"]), ("phase", ["--n", "-2"]),
    ("judge", ["in.jsonl", "--batch-size", "0"]),
    ("stability", ["--rows", "0"]), ("bench", ["--n", "0"])])
def test_zero_or_negative_counts_are_errors_everywhere(script, argv, capsys):
    """--n 0 once meant "the default" (50 samples, 9.5 minutes before someone stopped it); --batch-size -1
    wrote an empty file and exited 0. A count below 1 is an error naming the flag, before anything runs."""
    import importlib
    with pytest.raises(SystemExit) as e:
        importlib.import_module(script).main(argv)
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith(f"argument {argv[-2]}: {argv[-1]}: must be >= 1")
