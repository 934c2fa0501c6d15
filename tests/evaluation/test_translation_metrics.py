"""Translation metrics: sacreBLEU BLEU/chrF with signatures (against sacreBLEU's functions and its
CLI), tokenised BLEU on a hand-checked example, and paired bootstrap resampling."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.significance import PairedTest

from lmlab.errors import ConfigError, DataError
from lmlab.evaluation.translation import corpus_scores, paired_bootstrap, tokenized_bleu

SACREBLEU_CLI = Path(sys.executable).parent / "sacrebleu"
BLEU_SIGNATURE = "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"
CHRF_SIGNATURE = "nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.6.0"
WORDS = ["a", "man", "woman", "dog", "child", "ball", "street", "red", "blue", "young", "old", "is",
         "are", "runs", "sits", "plays", "with", "in", "on", "the", "near", "park", "water", "two",
         "three"]


def corpus(seed: int, n: int = 40, noise: float = 0.25) -> tuple[list[str], list[str]]:
    """References (fixed by `seed`), and hypotheses that drop or replace a share `noise` of
    their words (drawn from a second generator, so the references do not depend on `noise`)."""
    rng, noisy = random.Random(seed), random.Random(f"{seed} noise")
    refs, hyps = [], []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 12))]
        refs.append(" ".join(words).capitalize() + ".")
        hyp = []
        for w in words:
            roll = noisy.random()
            if roll < noise / 2:
                continue
            hyp.append(noisy.choice(WORDS) if roll < noise else w)
        hyps.append(" ".join(hyp).capitalize() + ".")
    return hyps, refs


def run_cli(tmp_path: Path, refs: list[str], *systems: list[str], args: list[str]) -> str:
    if not SACREBLEU_CLI.is_file():
        pytest.skip("the sacrebleu command is not installed beside this interpreter")
    (tmp_path / "ref.txt").write_text("\n".join(refs) + "\n", encoding="utf-8")
    names = []
    for i, hyps in enumerate(systems):
        names.append(str(tmp_path / f"sys{i}.txt"))
        Path(names[-1]).write_text("\n".join(hyps) + "\n", encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SACREBLEU_SEED", None)
    done = subprocess.run([str(SACREBLEU_CLI), str(tmp_path / "ref.txt"), "-i", *names,
                           "--format", "json", "-w", "4", *args],
                          capture_output=True, text=True, env=env, check=True, timeout=120)
    return done.stdout


# -- corpus scores -----------------------------------------------------------------------------
def test_bleu_and_chrf_are_sacrebleus_with_their_signatures() -> None:
    hyps, refs = corpus(0)
    scores = corpus_scores(hyps, refs)
    assert scores.bleu.score == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9)
    assert scores.chrf.score == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-9)
    assert 5 < scores.bleu.score < 90  # a real, non-degenerate comparison
    assert scores.bleu.signature == BLEU_SIGNATURE
    assert scores.chrf.signature == CHRF_SIGNATURE
    assert scores.n_sentences == 40


def test_scores_and_signatures_agree_with_the_sacrebleu_cli(tmp_path) -> None:
    hyps, refs = corpus(1)
    out = json.loads(run_cli(tmp_path, refs, hyps, args=["-m", "bleu", "chrf"]))
    cli = {entry["name"]: entry for entry in out}
    scores = corpus_scores(hyps, refs)
    assert round(scores.bleu.score, 4) == cli["BLEU"]["score"]
    assert round(scores.chrf.score, 4) == cli["chrF2"]["score"]
    assert scores.bleu.signature == cli["BLEU"]["signature"]
    assert scores.chrf.signature == cli["chrF2"]["signature"]


def test_format_prints_the_score_beside_its_signature() -> None:
    hyps, refs = corpus(2)
    scores = corpus_scores(hyps, refs, target_lang="de")
    assert scores.bleu.format() == f"BLEU = {scores.bleu.score:.2f} ({BLEU_SIGNATURE})"
    assert scores.chrf.format(width=1) == f"chrF2 = {scores.chrf.score:.1f} ({CHRF_SIGNATURE})"
    lines = scores.format().splitlines()
    assert [line.split(" = ")[0] for line in lines] == ["BLEU", "chrF2", "tokenised BLEU"]
    assert re.fullmatch(r"tokenised BLEU = \d+\.\d\d \(nrefs:1\|case:mixed\|eff:no\|tok:moses-de"
                        r"\|smooth:none\|version:2\.6\.0\|sacremoses:[\d.]+\)", lines[2])
    flat = scores.as_dict()
    assert flat["bleu"] == scores.bleu.score and flat["chrf_signature"] == CHRF_SIGNATURE


def test_tokenised_bleu_on_a_hand_checked_example() -> None:
    # Moses (en) splits the clitics: "The cat 's mat isn 't red ." (8 tokens) against
    # "The cat 's mat is not red ." (8). Matches: 1-grams 6/8 (The cat 's mat red .),
    # 2-grams 4/7 (The cat, cat 's, 's mat, red .), 3-grams 2/6, 4-grams 1/5 (The cat 's mat);
    # equal lengths, so BP = 1 and BLEU = (6/8 · 4/7 · 2/6 · 1/5)^(1/4).
    hyp, ref = ["The cat's mat isn't red."], ["The cat's mat is not red."]
    result = tokenized_bleu(hyp, ref, target_lang="en")
    assert result.score == pytest.approx(100 * (6 / 8 * 4 / 7 * 2 / 6 * 1 / 5) ** 0.25)
    assert result.score == pytest.approx(41.1134, abs=1e-4)
    assert "tok:moses-en" in result.signature and "smooth:none" in result.signature
    assert "multi-bleu.perl" in result.description
    # sacreBLEU's 13a keeps "cat's" and "isn't" whole: a different number (and smoothed).
    assert corpus_scores(hyp, ref).bleu.score == pytest.approx(
        sacrebleu.corpus_bleu(hyp, [ref]).score)
    assert abs(corpus_scores(hyp, ref).bleu.score - result.score) > 5
    # No smoothing, as multi-bleu.perl: no 4-gram match anywhere → 0.
    assert tokenized_bleu(["The dog's mat isn't blue."], ref).score == 0.0


def test_tokenised_bleu_follows_the_target_language() -> None:
    # Moses' German rules split "cat's" as "cat ' s"; its English rules as "cat 's".
    hyp = ["Das ist Peter's Hund, nicht Anna's Katze."]
    ref = ["Das ist Peter's Hund, nicht Paul's Katze."]
    english, german = tokenized_bleu(hyp, ref), tokenized_bleu(hyp, ref, target_lang="de")
    assert "tok:moses-en" in english.signature and "tok:moses-de" in german.signature
    # de: "Das ist Peter ' s Hund , nicht Anna ' s Katze ." against "... Paul ' s Katze .",
    # 13 tokens each; the one miss "Anna" spoils 1 of 13 unigrams, 2 of 12 bigrams, 3 of 11
    # trigrams, 4 of 10 4-grams. en: "Peter 's", "Anna 's": 11 tokens each, 1, 2, 3, 4 of
    # 11, 10, 9, 8 spoilt.
    assert german.score == pytest.approx(100 * (12 / 13 * 10 / 12 * 8 / 11 * 6 / 10) ** 0.25)
    assert english.score == pytest.approx(100 * (10 / 11 * 8 / 10 * 6 / 9 * 4 / 8) ** 0.25)


def test_mismatched_or_empty_input_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="3 hypotheses but 2 references"):
        corpus_scores(["a", "b", "c"], ["a", "b"])
    with pytest.raises(DataError, match="no sentences"):
        corpus_scores([], [])
    with pytest.raises(DataError, match="hypotheses line 2: expected a string"):
        corpus_scores(["a", None], ["a", "b"])


# -- paired bootstrap --------------------------------------------------------------------------
def test_identical_systems_are_not_significantly_different() -> None:
    hyps, refs = corpus(3)
    result = paired_bootstrap(hyps, list(hyps), refs, n_samples=200, seed=1)
    assert result.p_value == 1.0 and not result.significant
    assert result.baseline == result.system


def test_a_clearly_better_system_is_significant() -> None:
    baseline, refs = corpus(4, noise=0.6)
    better, _ = corpus(4, noise=0.1)
    result = paired_bootstrap(baseline, better, refs, n_samples=300, seed=1)
    assert result.system.score > result.baseline.score + 10
    assert result.p_value < 0.05 and result.significant
    assert result.p_value == pytest.approx(1 / 301)  # no resample comes close
    chrf = paired_bootstrap(baseline, better, refs, metric="chrf", n_samples=300, seed=1)
    assert chrf.metric == "chrF2" and chrf.p_value < 0.05


def test_bootstrap_is_deterministic_with_a_seed() -> None:
    baseline, refs = corpus(5, noise=0.3)
    system, _ = corpus(6, noise=0.3)
    system = system[:20] + baseline[20:]  # half the sentences differ: a non-trivial p-value
    first = paired_bootstrap(baseline, system, refs, n_samples=200, seed=7)
    again = paired_bootstrap(baseline, system, refs, n_samples=200, seed=7)
    other = paired_bootstrap(baseline, system, refs, n_samples=200, seed=8)
    assert first == again
    assert (first.system.mean, first.p_value) != (other.system.mean, other.p_value)
    assert first.system.score == other.system.score  # the real scores do not depend on it
    assert first.signature.startswith("nrefs:1|bs:200|seed:7|case:mixed")


def mixed_pair() -> tuple[list[str], list[str], list[str]]:
    """A baseline, and a system equal to it except that every 7th sentence is perfect (better)
    and every 9th cut to one word (worse): a p-value well inside (0, 1)."""
    baseline, refs = corpus(7, n=60, noise=0.3)
    system = [ref if i % 7 == 0 else hyp.split()[0] + " ." if i % 9 == 0 else hyp
              for i, (hyp, ref) in enumerate(zip(baseline, refs))]
    return baseline, system, refs


def test_bootstrap_equals_sacrebleus_paired_test() -> None:
    baseline, system, refs = mixed_pair()
    _, table = PairedTest([("base", baseline), ("sys", system)], {"BLEU": BLEU(), "chrF": CHRF()},
                          [refs], test_type="bs", n_samples=500)()
    for metric, key in (("bleu", "BLEU"), ("chrf", "chrF2")):
        ours = paired_bootstrap(baseline, system, refs, metric=metric, n_samples=500)
        base, sys_ = table[key]
        assert ours.baseline.score == pytest.approx(base.score)
        assert ours.baseline.mean == pytest.approx(base.mean, rel=1e-5)
        assert ours.baseline.ci == pytest.approx(base.ci, rel=1e-4)
        assert ours.system.mean == pytest.approx(sys_.mean, rel=1e-5)
        assert ours.system.ci == pytest.approx(sys_.ci, rel=1e-4)
        assert ours.p_value == pytest.approx(sys_.p_value)
    assert 0.01 < ours.p_value < 0.99  # a case where the p-value's formula matters


def test_bootstrap_equals_the_sacrebleu_cli_paired_bs(tmp_path) -> None:
    baseline, system, refs = mixed_pair()
    out = json.loads(run_cli(tmp_path, refs, baseline, system,
                             args=["-m", "bleu", "--paired-bs", "--paired-bs-n", "400"]))
    base, sys_ = out[0]["BLEU"], out[1]["BLEU"]
    ours = paired_bootstrap(baseline, system, refs, n_samples=400)
    assert (ours.baseline.score, ours.baseline.mean, ours.baseline.ci) == pytest.approx(
        (base["score"], base["mean"], base["ci"]), rel=1e-5)
    assert (ours.system.score, ours.system.mean, ours.system.ci) == pytest.approx(
        (sys_["score"], sys_["mean"], sys_["ci"]), rel=1e-5)
    assert ours.p_value == pytest.approx(sys_["p_value"])


def test_tokenised_bleu_bootstrap_and_bad_arguments() -> None:
    baseline, system, refs = mixed_pair()
    result = paired_bootstrap(baseline, system, refs, metric="tokenized_bleu", n_samples=100,
                              target_lang="de")
    assert result.metric == "tokenised BLEU"
    assert result.baseline.score == pytest.approx(
        tokenized_bleu(baseline, refs, target_lang="de").score)
    assert "tok:moses-de" in result.signature and "bs:100|seed:12345" in result.signature
    assert "p = " in result.format()
    with pytest.raises(ConfigError, match="metric must be one of bleu, chrf, tokenized_bleu"):
        paired_bootstrap(baseline, system, refs, metric="ter")
    with pytest.raises(ConfigError, match="n_samples must be at least 1"):
        paired_bootstrap(baseline, system, refs, n_samples=0)
    with pytest.raises(DataError, match="60 system hypotheses but 59 references"):
        paired_bootstrap(baseline[:59], system, refs[:59])
