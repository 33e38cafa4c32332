"""Report-generation language metrics as the R2Gen family computes them (docs/report_generation.md).

BLEU-1..4, METEOR, ROUGE-L and CIDEr come from ``pycocoevalcap`` (the COCO caption
scorers), called the way R2Gen's ``modules/metrics.py`` calls them: ``Bleu(4)``,
``Meteor()``, ``Rouge()`` and ``Cider()`` on ``{id: [text]}`` dicts, one hypothesis and
one or more references per id, no PTB tokenizer. Nothing here re-implements a metric;
this module only prepares the text and collects the scores.

Why the text is cleaned first: the scorers split on whitespace, so "effusion." and
"effusion" are different words to them. R2Gen scores the output of its tokenizer, whose
``clean_report_*`` lower-cases the report, drops list numbers ("1. ", " 2. "), cuts it at
". " into sentences, deletes the characters ``" / \\ '`` and ``. , ? ; * ! % ^ & _ + ( )
: ; < = > ? @ [ ] { }`` (its character class has ``:-\\[``, a range, so the hyphen
survives: "ground-glass" stays one word) and joins the sentences with " . ", ending in
" .". :func:`clean_report` does the same; two small differences: empty sentences are
dropped (R2Gen's check for them never fires) and whitespace is collapsed to single spaces
(R2Gen's decoded text already has single spaces; ROUGE-L here splits on " ", so a double
space would count as an empty word). R2Gen's vocabulary also maps rare words to
``<unk>`` before scoring; we score the words themselves, so no vocabulary enters.

Corpus figures: BLEU is pycocoevalcap's corpus BLEU ("closest" reference length for the
brevity penalty); ROUGE-L and CIDEr are means over ids; METEOR is the jar's aggregate over
all segments. CIDEr's document frequencies come from the evaluated references themselves,
so it depends on the set scored (a single id scores 0: every n-gram is in every document).

METEOR runs ``meteor-1.5.jar`` (shipped in the wheel) in a Java subprocess. Without a
``java`` on ``PATH``, or if the JVM fails, METEOR is NaN and the reason is logged; it is
never reported as 0. :func:`meteor_unavailable_reason` says beforehand whether it can run.
SPICE is not computed (it needs Stanford CoreNLP downloads).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import subprocess
import threading
from typing import Mapping, Sequence, Union

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as _meteor_module
from pycocoevalcap.rouge.rouge import Rouge

log = logging.getLogger(__name__)

METRIC_NAMES = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")

Texts = Union[Mapping[object, Union[str, Sequence[str]]], Sequence[Union[str, Sequence[str]]]]

# The characters R2Gen's sentence cleaner deletes (its class, with the ':-\[' range spelt out).
_DELETE = re.compile(r"""[.,?;*!%^&_+()\[\]{}:<=>@"/\\']""")
_DOTS = re.compile(r"\.\.+")


def clean_report(text: str) -> str:
    """The R2Gen cleaning of one report: lower case, no punctuation, sentences joined by " . "."""
    text = _DOTS.sub(".", " ".join(text.split()))
    text = text.replace("1. ", "")  # list numbers, as R2Gen drops them
    text = re.sub(r"\. [2-5]\. ", ". ", text)
    text = re.sub(r" [2-5]\. ", ". ", text)
    sentences = [_DELETE.sub("", s.strip().lower()) for s in text.strip().lower().split(". ")]
    sentences = [" ".join(s.split()) for s in sentences]
    return " . ".join(s for s in sentences if s) + " ."


def _as_dict(texts: Texts, what: str, allow_many: bool) -> dict[str, list[str]]:
    items = texts.items() if isinstance(texts, Mapping) else enumerate(texts)
    if isinstance(texts, str):
        raise ValueError(f"language_metrics: {what} must be a list or dict of reports, got one string")
    out = {}
    for key, value in items:
        values = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
        if not values or not all(isinstance(v, str) for v in values):
            raise ValueError(f"language_metrics: {what}[{key!r}] must be a string"
                             f"{' or a non-empty list of strings' if allow_many else ''}, got {value!r}")
        if len(values) != 1 and not allow_many:
            raise ValueError(f"language_metrics: {what}[{key!r}] must be one report, got {len(values)}")
        out[str(key)] = values
    return out


def meteor_unavailable_reason() -> str | None:
    """Why METEOR cannot run here (no Java runtime, no jar), or None when it can."""
    if shutil.which("java") is None:
        return "no 'java' on PATH (METEOR runs meteor-1.5.jar; install a Java runtime, e.g. openjdk-17-jre-headless)"
    jar = os.path.join(os.path.dirname(_meteor_module.__file__), _meteor_module.METEOR_JAR)
    if not os.path.exists(jar):
        return f"the METEOR jar {jar} is missing from the pycocoevalcap installation"
    return None


def _meteor(gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
    reason = meteor_unavailable_reason()
    if reason is not None:
        log.warning("METEOR is missing (reported as NaN): %s", reason)
        return math.nan
    # "|||" separates fields in the jar's line protocol (the wrapper strips it from hypotheses only)
    gts = {k: [r.replace("|||", " ") for r in v] for k, v in gts.items()}
    scorer = None
    try:
        scorer = _meteor_module.Meteor()
        score, _ = scorer.compute_score(gts, res)
        return float(score)
    except Exception as e:  # the JVM died or answered garbage: say so, never report 0
        stderr = ""
        if scorer is not None:
            _stop(scorer.meteor_p, wait_s=5.0)
            stderr = scorer.meteor_p.stderr.read().decode(errors="replace").strip()[-2000:]
        log.warning("METEOR is missing (reported as NaN): the METEOR subprocess failed: %r %s", e, stderr)
        return math.nan
    finally:
        if scorer is not None:
            _stop(scorer.meteor_p, wait_s=0.0)
            # A failed compute_score leaves the scorer's lock held; its __del__ takes that
            # lock, so give it a free one (it then only closes the finished process).
            scorer.lock = threading.Lock()


def _stop(process: subprocess.Popen, wait_s: float) -> None:
    """Ends the METEOR JVM (after ``wait_s`` for it to exit by itself) and closes its stdin."""
    try:
        process.stdin.close()
    except OSError:  # the JVM is gone and the pipe's last bytes cannot be flushed
        pass
    try:
        process.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def language_metrics(references: Texts, hypotheses: Texts, *, clean: bool = True,
                     meteor: bool = True) -> dict[str, float]:
    """BLEU_1..4, METEOR, ROUGE_L, CIDEr of ``hypotheses`` against ``references``.

    Args:
      references: ``{id: report or [reports]}`` or a list (ids are the positions); an id
        may have several references.
      hypotheses: the generated report per id, with the same ids (or the same length).
      clean: apply :func:`clean_report` to both sides (the R2Gen protocol); False scores the
        texts as given (already tokenised, space-separated).
      meteor: False skips the JVM (METEOR is then NaN, on purpose, without a warning).

    Returns:
      ``{name: value}`` for :data:`METRIC_NAMES`; METEOR is NaN when it could not run.
    """
    gts = _as_dict(references, "references", allow_many=True)
    res = _as_dict(hypotheses, "hypotheses", allow_many=False)
    if set(gts) != set(res):
        missing, extra = sorted(set(gts) - set(res))[:5], sorted(set(res) - set(gts))[:5]
        raise ValueError(f"language_metrics: references and hypotheses have different ids "
                         f"(no hypothesis for {missing}, no reference for {extra})")
    if not gts:
        raise ValueError("language_metrics: no reports to score")
    prep = clean_report if clean else (lambda t: " ".join(t.split()))
    gts = {k: [prep(t) for t in v] for k, v in gts.items()}
    res = {k: [prep(v[0])] for k, v in res.items()}

    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"BLEU_{n + 1}": float(b) for n, b in enumerate(bleu)})
    out["METEOR"] = _meteor(gts, res) if meteor else math.nan
    out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out
