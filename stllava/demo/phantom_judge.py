"""The *phantom judge*: a stand-in for GPT-4o that knows each phantom's ground truth.

It is served by :class:`stllava.demo.openai_stub.ChatCompletionServer`, so the demo drives
the real judge client (``stllava.selftrain.judge``, the ``openai`` package, HTTP, retries, cache)
exactly as it would drive GPT-4o. It identifies the image by the SHA-256 of the bytes in the
request's data URL, works out what the question asks (presence, side, count, size, modality) and
scores each answer 9 (right) or 2 (wrong) — a description (:mod:`stllava.demo.graded`) by its facts
right minus facts wrong, on the 1–10 scale. A question it cannot map to a fact gets "5 5" — a tie,
which the pipeline records and skips. Every reply names itself "phantom judge".

It can also be made a *noisy* judge, to study what wrong preference labels do:

* ``position_bias`` p — with probability p it prefers Answer 1 ("9 2") whatever the answers say;
* ``flip_rate`` f — otherwise, with probability f its verdict is reversed (the two scores swap;
  a tie stays a tie).

Both are decided per judged record by a hash of the record — the image's SHA-256, the question
and both answers in their order, which is all a request carries — and ``noise_seed``, never by a
random stream: the same records get the same verdicts whatever the request order or concurrency.
A question or image the judge cannot map stays a tie. A noisy verdict says so in its reply.
Defaults 0: the perfect judge. Descriptions are graded only when the judge is made with
``graded`` (the graded-answer probe); otherwise they are ties, as before the probe existed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import sys

from stllava import logs
from stllava.data.images import image_path
from stllava.demo.graded import describe, is_describe_question, judge_score, parse_description, truth_from_reference
from stllava.demo.openai_stub import ChatCompletionServer, Reply, request_images, request_text
from stllava.errors import StllavaError, run_cli
from stllava.selftrain.judge_prompt import split_prompt

logger = logging.getLogger(__name__)

JUDGE_NAME = "phantom-judge"
NUMBERS = {"zero": 0, "no": 0, "none": 0, "one": 1, "two": 2, "three": 3, "0": 0, "1": 1, "2": 2, "3": 3}
MODALITY_WORDS = {"x-ray": "x-ray", "xray": "x-ray", "radiograph": "x-ray", "ct": "ct", "mri": "mri", "mr": "mri"}


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9\-]+", text.lower())


def question_kind(question: str) -> tuple[str, str] | None:
    """``(form, kind)`` of a question: form "yesno" or "open"; kind the fact it asks about —
    "modality", "count", "side", "size" or "presence"; or ``("graded", "describe")`` for the
    description question of :mod:`stllava.demo.graded`. None when it maps to no phantom fact."""
    if is_describe_question(question):
        return "graded", "describe"
    q = words(question)
    yesno = bool(q) and q[0] in {"is", "are", "does", "do", "can"}
    if yesno:
        if any(w in MODALITY_WORDS for w in q):
            return "yesno", "modality"
        if "more" in q and "one" in q:
            return "yesno", "count"
        if "left" in q or "right" in q:
            return "yesno", "side"
        if {"lesion", "lesions", "mass", "abnormality"} & set(q):
            return "yesno", "presence"
        return None
    if "modality" in q or ("what" in q and ("scan" in q or "imaging" in q)):
        return "open", "modality"
    if "many" in q:
        return "open", "count"
    if "side" in q:
        return "open", "side"
    if "large" in q or "size" in q or "big" in q:
        return "open", "size"
    return None


def expected_answer(question: str, facts: dict) -> tuple[str, str] | None:
    """``(form, answer)`` the phantom's facts give for ``question``, or None if it asks about
    something the judge does not know (or about the side or size of lesions a phantom without
    lesions does not have). form is "yesno", "open" or "graded" (answer: the reference description)."""
    found = question_kind(question)
    if found is None:
        return None
    form, kind = found
    if form == "graded":
        return form, describe(facts)
    q = words(question)
    sides = {les["side"] for les in facts["lesions"]}
    count = facts["count"]
    if form == "yesno":
        if kind == "modality":
            asked = next(MODALITY_WORDS[w] for w in q if w in MODALITY_WORDS)
            return form, "yes" if asked == facts["modality"] else "no"
        if kind == "count":
            return form, "yes" if count > 1 else "no"
        if kind == "side":
            side = "left" if "left" in q else "right"
            return form, "yes" if side in sides else "no"
        return form, "yes" if count else "no"
    if kind == "modality":
        return form, facts["modality"]
    if kind == "count":
        return form, str(count)
    if not count:
        return None
    if kind == "side":
        return form, "both" if len(sides) == 2 else next(iter(sides))
    return form, "large" if any(les["size"] == "large" for les in facts["lesions"]) else "small"


def is_right(answer: str, kind: str, expected: str) -> bool:
    """Whether ``answer`` gives the ``expected`` answer of a question of form ``kind``; a graded
    description is right when it states every fact of ``expected`` and nothing wrong."""
    if kind == "graded":
        return parse_description(answer) == {k: v for k, v in truth_from_reference(expected).items()
                                             if v is not None}
    a = words(answer)
    if not a:
        return False
    if kind == "yesno":
        return a[0] == expected
    if expected.isdigit():
        return any(NUMBERS.get(w) == int(expected) for w in a[:3])
    return expected in a[:4]


def check_noise(flip_rate: float, position_bias: float) -> None:
    """Refuse (StllavaError) a flip rate or position bias outside [0, 1]; returns None."""
    for name, value in (("flip rate", flip_rate), ("position bias", position_bias)):
        if not 0 <= value <= 1:
            raise StllavaError(f"phantom judge {name} {value} is not a probability", fix="pass a value in [0, 1]")


def record_draw(what: str, noise_seed: int | str, image_sha256: str, question: str, a1: str, a2: str) -> float:
    """A number in [0, 1) fixed by the judged record (image, question, Answer 1, Answer 2), the
    seed and ``what`` ("flip" or "position"): the noisy judge's coin, the same in any request order."""
    blob = json.dumps([what, noise_seed, image_sha256, question, a1, a2]).encode("utf-8")
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") / 2.0**64


class PhantomJudge:
    """Scorer for :class:`ChatCompletionServer`. ``facts``: image file name → phantom facts;
    ``image_folder``: where those images are (hashed once to recognise request images);
    ``flip_rate``, ``position_bias``, ``noise_seed``: the noise of the module docstring (0, 0: none);
    ``graded``: score description answers (:func:`stllava.demo.graded.judge_score`).
    Refuses (StllavaError) a rate outside [0, 1]."""

    def __init__(self, facts: dict[str, dict], image_folder: str, flip_rate: float = 0.0,
                 position_bias: float = 0.0, noise_seed: int | str = 0, graded: bool = False):
        check_noise(flip_rate, position_bias)
        self.graded = graded
        self.flip_rate, self.position_bias, self.noise_seed = flip_rate, position_bias, noise_seed
        self.by_hash = {}
        for name, f in facts.items():
            with open(image_path(image_folder, name), "rb") as fh:
                self.by_hash[hashlib.sha256(fh.read()).hexdigest()] = f
        self.calls = 0

    def __call__(self, body: dict) -> Reply:
        self.calls += 1
        images = request_images(body)
        question, a1, a2, _ = split_prompt(request_text(body))
        image_sha = hashlib.sha256(images[0][1]).hexdigest() if images else None
        facts = self.by_hash.get(image_sha) if images else None
        if facts is None:
            return Reply(f"5 5\nThe {JUDGE_NAME} does not know this image.", model=JUDGE_NAME)
        exp = expected_answer(question, facts)
        if exp is None or (exp[0] == "graded" and not self.graded):
            return Reply(f"5 5\nThe {JUDGE_NAME} cannot map this question to a known fact.", model=JUDGE_NAME)
        kind, truth = exp
        if kind == "graded":  # partly right answers: a score per fact (stllava.demo.graded)
            s1, s2 = (judge_score(a, facts) for a in (a1, a2))
        else:
            s1, s2 = (9 if is_right(a, kind, truth) else 2 for a in (a1, a2))
        note = ""
        record = (image_sha, question, a1, a2)
        if self.position_bias and record_draw("position", self.noise_seed, *record) < self.position_bias:
            s1, s2, note = 9, 2, " Noise: position bias, Answer 1 preferred."
        elif self.flip_rate and record_draw("flip", self.noise_seed, *record) < self.flip_rate and s1 != s2:
            s1, s2, note = s2, s1, " Noise: verdict reversed."
        return Reply(f"{s1} {s2}\nThe {JUDGE_NAME} knows the answer is '{truth}'.{note}", model=JUDGE_NAME)


def build_server(facts_file: str, image_folder: str, port: int = 0, *, flip_rate: float = 0.0,
                 position_bias: float = 0.0, noise_seed: int | str = 0, graded: bool = False) -> ChatCompletionServer:
    """The phantom judge (noisy with ``flip_rate`` / ``position_bias``, grading descriptions with
    ``graded``, see :class:`PhantomJudge`)
    on 127.0.0.1:``port`` (0 = a free port), not started yet."""
    with open(facts_file) as f:
        facts = json.load(f)
    judge = PhantomJudge(facts, image_folder, flip_rate=flip_rate, position_bias=position_bias,
                         noise_seed=noise_seed, graded=graded)
    return ChatCompletionServer(judge, port=port, model=JUDGE_NAME)


def serve(facts_file: str, image_folder: str, port: int = 0, *, flip_rate: float = 0.0,
          position_bias: float = 0.0, noise_seed: int | str = 0, graded: bool = False) -> ChatCompletionServer:
    """Start the phantom judge (noisy and graded as :func:`build_server` says) in a background thread;
    returns the server."""
    return build_server(facts_file, image_folder, port, flip_rate=flip_rate, position_bias=position_bias,
                        noise_seed=noise_seed, graded=graded).start()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", required=True, help="facts.json written with the phantom images")
    ap.add_argument("--image-folder", required=True)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--flip-rate", type=float, default=0.0, help="share of verdicts reversed (default 0)")
    ap.add_argument("--position-bias", type=float, default=0.0,
                    help="share of records where Answer 1 wins whatever it says (default 0)")
    ap.add_argument("--noise-seed", type=int, default=0, help="seed of the per-record noise draws")
    ap.add_argument("--graded", action="store_true", help="grade description answers (facts right minus wrong)")
    logs.add_log_level_arg(ap)
    args = ap.parse_args(argv)
    logs.setup(args.log_level)
    server = build_server(args.facts, args.image_folder, args.port, flip_rate=args.flip_rate,
                          position_bias=args.position_bias, noise_seed=args.noise_seed, graded=args.graded)
    print(f"{JUDGE_NAME} serving on {server.base_url}")
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(run_cli(main))
