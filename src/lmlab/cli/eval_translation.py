"""`lmlab eval translation --hypotheses FILE [--references FILE] [--baseline FILE] [--lang L]`:
sacreBLEU BLEU, chrF and tokenised BLEU of a system's output, each with its signature, and with
`--baseline` the paired bootstrap test of the system against another one on the same sentences.

A file is plain text (one sentence per line), or JSONL as `lmlab finetune translation` writes
its `translations_<split>.jsonl` (`hypothesis` and `reference` fields): then the references come
from the hypotheses' file unless `--references` is given."""

from __future__ import annotations

import json
from pathlib import Path

from lmlab.errors import DataError
from lmlab.evaluation.translation import SACREBLEU_SEED, corpus_scores, paired_bootstrap


def add_arguments(parser) -> None:
    parser.add_argument("--hypotheses", required=True, type=Path,
                        help="the system's translations: a text file (one per line) or a run's "
                             "translations_<split>.jsonl")
    parser.add_argument("--references", type=Path, default=None,
                        help="the reference translations, line by line (default: the "
                             "`reference` field of a JSONL --hypotheses file)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another system's translations of the same sentences: adds the "
                             "paired bootstrap test of --hypotheses against it")
    parser.add_argument("--lang", default=None,
                        help="the target language (e.g. de): its Moses rules for tokenised BLEU "
                             "(default: English rules)")
    parser.add_argument("--samples", type=int, default=1000,
                        help="bootstrap resamples (with --baseline)")
    parser.add_argument("--seed", type=int, default=SACREBLEU_SEED,
                        help="bootstrap seed (sacreBLEU's default)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON record")


def read_lines(path: Path, field: str) -> list[str]:
    """Sentences of a text file, or the `field` of each record of a .jsonl file."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if path.suffix != ".jsonl":
        return lines
    out = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {number}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise DataError(f"{path} line {number}: expected an object with a string field "
                            f"'{field}'")
        out.append(record[field])
    return out


def run(args) -> int:
    hypotheses = read_lines(args.hypotheses, "hypothesis")
    if args.references is not None:
        references, where = read_lines(args.references, "reference"), args.references
    elif args.hypotheses.suffix == ".jsonl":
        references, where = read_lines(args.hypotheses, "reference"), args.hypotheses
    else:
        raise DataError("--references is required when --hypotheses is a text file")
    if len(hypotheses) != len(references):
        raise DataError(f"{args.hypotheses} has {len(hypotheses)} sentences but {where} has "
                        f"{len(references)}: they must align line by line")
    scores = corpus_scores(hypotheses, references, target_lang=args.lang)
    tests = []
    if args.baseline is not None:
        baseline = read_lines(args.baseline, "hypothesis")
        if len(baseline) != len(references):
            raise DataError(f"{args.baseline} has {len(baseline)} sentences but {where} has "
                            f"{len(references)}: they must align line by line")
        tests = [paired_bootstrap(baseline, hypotheses, references, metric=metric,
                                  n_samples=args.samples, seed=args.seed,
                                  target_lang=args.lang) for metric in ("bleu", "chrf")]
    if args.json:
        record = scores.as_dict()
        for test in tests:
            key = "bootstrap_" + ("bleu" if test.metric == "BLEU" else "chrf")
            record[key] = {"baseline": test.baseline.score, "system": test.system.score,
                           "baseline_mean": test.baseline.mean, "baseline_ci": test.baseline.ci,
                           "system_mean": test.system.mean, "system_ci": test.system.ci,
                           "p_value": test.p_value, "signature": test.signature}
        print(json.dumps(record))
        return 0
    print(f"{scores.n_sentences:,} sentences")
    print(scores.format())
    for test in tests:
        print(test.format())
    if tests:
        print("* significant at p < 0.05 (paired bootstrap, Koehn 2004)")
    return 0
