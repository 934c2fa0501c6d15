"""`lmlab eval translation`: the scores and signatures of the library (and so of sacreBLEU), from
text files or a run's translations JSONL; the paired bootstrap against a baseline; one-line
errors for files that do not align."""

from __future__ import annotations

import json

import sacrebleu
from conftest import run_cli

REFS = ["Ein Mann fährt mit dem Fahrrad.", "Zwei Hunde spielen im Schnee.",
        "Eine Frau liest ein Buch im Park.", "Kinder spielen Fußball auf einer Wiese."] * 5
GOOD = ["Ein Mann fährt mit dem Fahrrad.", "Zwei Hunde spielen im Schnee.",
        "Eine Frau liest ein Buch im Park.", "Kinder spielen Fußball auf der Wiese."] * 5
BAD = ["Ein Mann fährt.", "Hunde im Schnee.", "Eine Frau im Park.", "Kinder spielen."] * 5


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_scores_from_text_files_match_sacrebleu(tmp_path, capsys):
    hyp, ref = write(tmp_path / "hyp.de", GOOD), write(tmp_path / "ref.de", REFS)
    code, out, err = run_cli(capsys, "eval", "translation", "--hypotheses", str(hyp),
                             "--references", str(ref), "--lang", "de", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["n_sentences"] == 20
    assert abs(record["bleu"] - sacrebleu.corpus_bleu(GOOD, [REFS]).score) < 1e-9
    assert abs(record["chrf"] - sacrebleu.corpus_chrf(GOOD, [REFS]).score) < 1e-9
    assert record["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert "tok:moses-de" in record["tokenized_bleu_signature"]


def test_a_runs_translations_file_and_a_baseline(tmp_path, capsys):
    run_file = tmp_path / "translations_test.jsonl"
    run_file.write_text("".join(json.dumps({"source": "x", "reference": r, "hypothesis": h}) + "\n"
                                for r, h in zip(REFS, GOOD)), encoding="utf-8")
    baseline = write(tmp_path / "baseline.de", BAD)
    code, out, err = run_cli(capsys, "eval", "translation", "--hypotheses", str(run_file),
                             "--baseline", str(baseline), "--samples", "200")
    assert code == 0, err
    assert "BLEU = " in out and "(nrefs:1|bs:200|seed:12345|" in out
    bootstrap = [line for line in out.splitlines() if line.startswith("BLEU: baseline")]
    assert len(bootstrap) == 1 and bootstrap[0].split("p = ")[1].split()[0].endswith("*")


def test_files_that_do_not_align_are_one_line_errors(tmp_path, capsys):
    hyp, ref = write(tmp_path / "hyp.de", GOOD[:3]), write(tmp_path / "ref.de", REFS)
    code, _, err = run_cli(capsys, "eval", "translation", "--hypotheses", str(hyp),
                           "--references", str(ref))
    assert code == 2
    assert err.strip().count("\n") == 0
    assert "hyp.de has 3 sentences but" in err and "ref.de has 20" in err
    code, _, err = run_cli(capsys, "eval", "translation", "--hypotheses", str(hyp))
    assert code == 2 and "--references is required" in err
    bad = tmp_path / "run.jsonl"
    bad.write_text('{"hypothesis": "a"}\n', encoding="utf-8")
    code, _, err = run_cli(capsys, "eval", "translation", "--hypotheses", str(bad))
    assert code == 2 and "run.jsonl line 1: expected an object with a string field 'reference'" in err
