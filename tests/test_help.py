"""`--help` of every script, as a new user first meets it: it works, and shows each default once."""
import os
import re
import runpy
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["sample.py", "fid.py", "toy_2d.py", "train_text.py", "benchmarks/captioned_fashion.py",
           "benchmarks/caption_judge.py",
           "benchmarks/fid_benchmark.py", "benchmarks/text_fashion_experiment.py",
           "benchmarks/train_class_quality.py", "benchmarks/train_class_throughput.py",
           "benchmarks/train_text_eval.py", "benchmarks/train_text_speed.py"]


def help_of(argv, monkeypatch, capsys):
    """What `python SCRIPT [COMMAND] --help` prints (run in this process: torch is imported once)."""
    path = os.path.join(ROOT, argv[0])
    monkeypatch.setattr(sys, "argv", [path, *argv[1:], "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the benchmarks add the repository to it
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(path, run_name="__main__")
    assert exit_.value.code in (0, None)
    return capsys.readouterr().out


def assert_each_default_once(text):
    # One entry per option: its first line starts at 2 spaces, its wrapped help lines further in.
    for entry in re.split(r"\n(?=  \S)", text):
        entry = " ".join(entry.split())
        assert entry.count("(default:") <= 1 and "(default: None)" not in entry, entry
    return text


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_each_default_once(script, monkeypatch, capsys):
    text = help_of([script], monkeypatch, capsys)
    assert text.startswith("usage: ")
    assert text.split("\n\n")[1].endswith("."), "the description stops mid-sentence"
    assert_each_default_once(text)


def test_fid_help_leads_to_each_command_and_their_options(monkeypatch, capsys):
    text = help_of(["fid.py"], monkeypatch, capsys)
    assert "fid.py {ref,calc,clip} --help" in text
    for command in ("ref", "calc", "clip"):
        assert re.search(rf"^    {command} +\S", text, re.MULTILINE)  # listed with what it does
        assert "--images" in assert_each_default_once(help_of(["fid.py", command], monkeypatch, capsys))
