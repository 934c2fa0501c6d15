"""Translation metrics that can be compared: sacreBLEU BLEU and chrF with their signatures,
tokenised BLEU as papers report it, and paired bootstrap resampling between two systems.

BLEU figures are notoriously irreproducible because "BLEU" names many computations (which
tokeniser, which casing, which smoothing, which script). sacreBLEU fixes one and prints a
*signature* that says which; every score here carries its signature, and `format()` prints the
two side by side::

    BLEU = 38.21 (nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0)

Tokenised BLEU is the number most papers before sacreBLEU report (e.g. fairseq's Multi30k
results): hypotheses and references are Moses-tokenised (sacremoses, the Python port of
`tokenizer.perl`) and scored on those tokens with no further tokenisation and no smoothing,
as `multi-bleu.perl` does. Its signature says so (`tok:moses-de|smooth:none|...|sacremoses:…`).
It depends on the tokeniser, so compare it only with numbers computed the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version

import numpy as np

from lmlab.errors import ConfigError, DataError

# sacreBLEU's own default seed for its resampling tests (its SACREBLEU_SEED): with it, the
# paired bootstrap below reproduces `sacrebleu REF -i BASE SYS --paired-bs` figure for figure.
SACREBLEU_SEED = 12345
METRICS = ("bleu", "chrf", "tokenized_bleu")


@dataclass(frozen=True)
class MetricResult:
    """One corpus score (0–100) and the signature that says how it was computed."""

    name: str  # "BLEU", "chrF2", "tokenised BLEU"
    score: float
    signature: str
    description: str = ""  # what the score is, in words (tokenised BLEU explains itself here)

    def format(self, width: int = 2) -> str:
        """`BLEU = 38.21 (nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0)`"""
        return f"{self.name} = {self.score:.{width}f} ({self.signature})"


@dataclass(frozen=True)
class TranslationScores:
    bleu: MetricResult  # sacreBLEU BLEU on detokenised text (13a tokeniser): the figure to report
    chrf: MetricResult  # sacreBLEU chrF2 (character 6-grams, beta 2)
    tokenized_bleu: MetricResult  # Moses-tokenised BLEU, multi-bleu.perl style (papers' figure)
    n_sentences: int

    def format(self, width: int = 2) -> str:
        """One line per metric, each score with its signature."""
        return "\n".join(m.format(width) for m in (self.bleu, self.chrf, self.tokenized_bleu))

    def as_dict(self) -> dict:
        """Flat numbers and signatures for JSON logs and metrics files."""
        out: dict = {"n_sentences": self.n_sentences}
        for key in ("bleu", "chrf", "tokenized_bleu"):
            metric = getattr(self, key)
            out[key] = metric.score
            out[f"{key}_signature"] = metric.signature
        return out


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str], *,
                  target_lang: str | None = None) -> TranslationScores:
    """sacreBLEU BLEU and chrF, and tokenised BLEU, of detokenised `hypotheses` against one
    reference each. `target_lang` (e.g. "de") picks the Moses tokeniser's language rules for
    tokenised BLEU (English when None) and is passed to sacreBLEU as its target language."""
    hypotheses, references = _check(hypotheses, references)
    bleu, chrf = _sacre_bleu(target_lang), _sacre_chrf()
    bleu_score = bleu.corpus_score(hypotheses, [references])
    chrf_score = chrf.corpus_score(hypotheses, [references])
    tokenized = tokenized_bleu(hypotheses, references, target_lang=target_lang)
    return TranslationScores(
        bleu=MetricResult("BLEU", bleu_score.score, str(bleu.get_signature()),
                          "sacreBLEU BLEU on detokenised text"),
        chrf=MetricResult(chrf_score.name, chrf_score.score, str(chrf.get_signature()),
                          "sacreBLEU chrF on detokenised text"),
        tokenized_bleu=tokenized, n_sentences=len(hypotheses))


def tokenized_bleu(hypotheses: Sequence[str], references: Sequence[str], *,
                   target_lang: str | None = None) -> MetricResult:
    """BLEU as `tokenizer.perl -l LANG | multi-bleu.perl` computes it: both sides Moses-tokenised
    (sacremoses, no escaping, no aggressive hyphen splitting, case kept), then plain BLEU on
    those tokens (sacreBLEU with tokenize='none' and smooth_method='none': 0 when any n-gram
    order has no match, as multi-bleu.perl)."""
    hypotheses, references = _check(hypotheses, references)
    lang = target_lang or "en"
    moses = _moses(lang)
    metric = _tokenized_metric()
    score = metric.corpus_score(moses(hypotheses), [moses(references)])
    return MetricResult("tokenised BLEU", score.score, _tokenized_signature(metric, lang),
                        f"BLEU on Moses-tokenised text (sacremoses, lang {lang}, no escaping, "
                        "no aggressive hyphen splitting), no smoothing, like multi-bleu.perl")


# -- paired bootstrap --------------------------------------------------------------------------
@dataclass(frozen=True)
class SystemEstimate:
    score: float  # the corpus score of the system's actual output
    mean: float  # mean over the bootstrap resamples
    ci: float  # half-width of the 95% confidence interval: mean ± ci

    def format(self, width: int = 2) -> str:
        return f"{self.score:.{width}f} (μ = {self.mean:.{width}f} ± {self.ci:.{width}f})"


@dataclass(frozen=True)
class PairedBootstrap:
    """Paired bootstrap resampling (Koehn, 2004) of `system` against `baseline`."""

    metric: str  # "BLEU", "chrF2" or "tokenised BLEU"
    baseline: SystemEstimate
    system: SystemEstimate
    p_value: float  # chance of a difference at least this large if the systems were equal
    n_samples: int
    seed: int
    signature: str  # the metric's signature with resamples and seed (bs:1000|seed:12345)

    @property
    def significant(self) -> bool:
        """At the usual 0.05 level."""
        return self.p_value < 0.05

    def format(self, width: int = 2) -> str:
        star = "*" if self.significant else ""
        return (f"{self.metric}: baseline {self.baseline.format(width)}, system "
                f"{self.system.format(width)}, p = {self.p_value:.4f}{star} ({self.signature})")


def paired_bootstrap(baseline_hyps: Sequence[str], system_hyps: Sequence[str],
                     references: Sequence[str], *, metric: str = "bleu", n_samples: int = 1000,
                     seed: int = SACREBLEU_SEED, target_lang: str | None = None
                     ) -> PairedBootstrap:
    """Is `system_hyps` really better (or worse) than `baseline_hyps`? Both are resampled with the
    same `n_samples` sets of sentence indices (drawn with replacement, numpy's default_rng(seed));
    each resample's corpus score is computed from per-sentence sufficient statistics. Each
    system gets its mean and 95% interval over the resamples, and the p-value is sacreBLEU's:
    the share of resamples whose centred absolute difference exceeds the real one, (c+1)/(n+1).

    This is sacreBLEU's `--paired-bs` (same indices, same formulas; with the default seed, the
    same figures as its CLI). One departure: for two identical outputs every resample differs
    by 0, and sacreBLEU's strict "exceeds" then reports p = 1/(n+1), i.e. a system
    "significantly" different from itself; here that case is p = 1.
    """
    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if n_samples < 1:
        raise ConfigError(f"n_samples must be at least 1, got {n_samples}")
    baseline_hyps, references = _check(baseline_hyps, references, what="baseline hypotheses")
    system_hyps, _ = _check(system_hyps, references, what="system hypotheses")
    if metric == "tokenized_bleu":
        moses = _moses(target_lang or "en")
        baseline_hyps, system_hyps, references = (
            moses(baseline_hyps), moses(system_hyps), moses(references))
        scorer = _tokenized_metric()
    else:
        scorer = _sacre_bleu(target_lang) if metric == "bleu" else _sacre_chrf()

    # Not sacreBLEU's PairedTest itself: it takes its seed only from the SACREBLEU_SEED
    # environment variable (and reads seed 0 as "unseeded"). Its metric methods below are
    # private, hence the pinned sacrebleu; tests compare every figure with PairedTest and its CLI.
    # Per-sentence sufficient statistics (n-gram matches and totals, lengths), as sacreBLEU.
    refs = [references]
    base_stats = np.array(scorer._extract_corpus_statistics(baseline_hyps, refs), dtype=np.float32)
    sys_stats = np.array(scorer._extract_corpus_statistics(system_hyps, refs), dtype=np.float32)
    base_real = scorer._compute_score_from_stats(base_stats.sum(0))
    sys_real = scorer._compute_score_from_stats(sys_stats.sum(0))

    rng = np.random.default_rng(seed)
    idxs = rng.choice(len(references), size=(n_samples, len(references)), replace=True)
    base_scores = np.array([scorer._compute_score_from_stats(s.sum(0)).score
                            for s in base_stats[idxs]])
    sys_scores = np.array([scorer._compute_score_from_stats(s.sum(0)).score
                           for s in sys_stats[idxs]])

    real_diff = abs(base_real.score - sys_real.score)
    sample_diffs = np.abs(sys_scores - base_scores)
    if real_diff == 0 and not sample_diffs.any():
        p_value = 1.0  # identical outputs: no evidence of any difference
    else:
        exceed = int(np.sum(sample_diffs - sample_diffs.mean() > real_diff))
        p_value = (exceed + 1) / (n_samples + 1)

    if metric == "tokenized_bleu":
        name, signature = "tokenised BLEU", _tokenized_signature(scorer, target_lang or "en")
    else:
        name, signature = base_real.name, str(scorer.get_signature())
    return PairedBootstrap(metric=name, baseline=SystemEstimate(base_real.score,
                                                                *_mean_ci(base_scores)),
                           system=SystemEstimate(sys_real.score, *_mean_ci(sys_scores)),
                           p_value=p_value, n_samples=n_samples, seed=seed,
                           # where sacreBLEU's --paired-bs puts them: after nrefs
                           signature=signature.replace("|", f"|bs:{n_samples}|seed:{seed}|", 1))


def _mean_ci(scores: np.ndarray) -> tuple[float, float]:
    """Mean and half-width of the 95% interval between the 2.5% and 97.5% order statistics,
    exactly as sacreBLEU's `estimate_ci`."""
    scores = np.sort(scores)
    lower = len(scores) // 40
    return float(scores.mean()), float(0.5 * (scores[len(scores) - lower - 1] - scores[lower]))


# -- helpers -----------------------------------------------------------------------------------
def _check(hypotheses: Sequence[str], references: Sequence[str], *,
           what: str = "hypotheses") -> tuple[list[str], list[str]]:
    hypotheses, references = list(hypotheses), list(references)
    if len(hypotheses) != len(references):
        raise DataError(f"{len(hypotheses)} {what} but {len(references)} references; "
                        "expected one reference per hypothesis")
    if not references:
        raise DataError("no sentences to score")
    for kind, lines in ((what, hypotheses), ("references", references)):
        for number, line in enumerate(lines, 1):
            if not isinstance(line, str):
                raise DataError(f"{kind} line {number}: expected a string, got "
                                f"{type(line).__name__}")
    return hypotheses, references


def _sacre_bleu(target_lang: str | None):
    from sacrebleu.metrics import BLEU

    return BLEU(trg_lang=target_lang or "")


def _sacre_chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()


def _tokenized_metric():
    from sacrebleu.metrics import BLEU

    # force: the input *is* tokenised, so no "looks tokenised" warning
    return BLEU(tokenize="none", smooth_method="none", force=True)


def _tokenized_signature(metric, lang: str) -> str:
    """sacreBLEU's signature of the plain BLEU on Moses tokens, saying which tokeniser ran."""
    signature = str(metric.get_signature()).replace("tok:none", f"tok:moses-{lang}")
    return f"{signature}|sacremoses:{version('sacremoses')}"


def _moses(lang: str):
    """Lines → Moses-tokenised lines, as `tokenizer.perl -l LANG -no-escape` writes them."""
    tokenizer = _moses_tokenizer(lang)
    return lambda lines: [tokenizer.tokenize(line, escape=False, return_str=True)
                          for line in lines]


@functools.lru_cache(maxsize=8)
def _moses_tokenizer(lang: str):
    from sacremoses import MosesTokenizer

    return MosesTokenizer(lang=lang)
