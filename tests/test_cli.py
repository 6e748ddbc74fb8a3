"""The command-line contract: quantize / eval / compare, JSON output, one-line errors."""
import json
import subprocess
import sys

import pytest

from zquant.cli import main


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def text_file(tmp_path):
    f = tmp_path / "eval.txt"
    f.write_text("A lazy dog sleeps while the quick brown fox jumps over it. " * 40, encoding="utf-8")
    return f


def test_quantize_eval_compare_end_to_end(tiny_model_dir, text_file, tmp_path, capsys):
    out_dir = tmp_path / "q"
    code, out, _ = run(["quantize", tiny_model_dir, "--scheme", "w4/8a8", "--out", out_dir, "--quiet"], capsys)
    assert code == 0 and out.strip() == str(out_dir)
    assert (out_dir / "zquant.json").exists() and (out_dir / "tokenizer.json").exists()

    code, out, _ = run(["eval", out_dir, "--ppl", text_file, "--max-tokens", "300", "--window", "64", "--json",
                        "--quiet"], capsys)
    assert code == 0
    q = json.loads(out)
    assert q["tokens"] > 200 and q["perplexity"] > 1

    code, out, _ = run(["eval", tiny_model_dir, "--ppl", text_file, "--max-tokens", "300", "--window", "64",
                        "--json", "--quiet"], capsys)
    fp = json.loads(out)
    assert code == 0 and fp["tokens"] == q["tokens"] and fp["bytes"] > q["bytes"]

    code, out, _ = run(["compare", tiny_model_dir, "--schemes", "w8a8,w4/8a16", "--ppl", text_file,
                        "--max-tokens", "300", "--window", "64", "--json", "--quiet"], capsys)
    rows = json.loads(out)["rows"]
    assert [r["scheme"] for r in rows] == ["fp32", "w8a8", "w4/8a16"]
    assert rows[0]["perplexity"] == pytest.approx(fp["perplexity"])

    code, out, _ = run(["compare", tiny_model_dir, "--schemes", "w8a8", "--ppl", text_file, "--max-tokens", "200",
                        "--window", "64", "--quiet", "--override", "*.mlp.*=fp"], capsys)
    assert code == 0 and "| w8a8" in out and "perplexity" in out


@pytest.mark.parametrize("args,message", [
    (["quantize", "no/such-model", "--scheme", "w8a8"], "never downloads"),
    (["quantize", "TINY", "--scheme", "w3a8"], "unknown scheme 'w3a8'"),
    (["quantize", "TINY", "--scheme", "w8a8", "--override", "*.fc:bits=x"], "must be an integer"),
    (["eval", "TINY", "--ppl", "/no/such/file.txt"], "not found"),
    (["compare", "TINY", "--schemes", "w8a8,nope"], "unknown scheme 'nope'"),
])
def test_errors_are_one_clear_line(tiny_model_dir, args, message, capsys):
    args = [str(tiny_model_dir) if a == "TINY" else a for a in args]
    code, out, err = run(args, capsys)
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("zquant: error")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err


def test_console_script_help():
    res = subprocess.run([sys.executable, "-m", "zquant.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "quantize" in res.stdout and "compare" in res.stdout
