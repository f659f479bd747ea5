"""Rendering + label masks (docs/Method.md#loss-masks): zero tokenization mismatches, exact trained spans.

Every check compares against an independent construction: the prompt is rebuilt here from the
docs/Method.md's strings, and each trained run must equal ``tokenizer(answer) + [</s>]`` tokenized alone.
Real-tokenizer tests use shared ``data/llama-tokenizer`` in both ``legacy`` modes, through the
transformers 5 ``LlamaTokenizer`` and through a SentencePiece ("slow") tokenizer with the
transformers 4.3x ``LlamaTokenizer.tokenize`` rules that LLaVA / SQ-LLaVA / STLLaVA-Med trained with.
The tiny-tokenizer tests need nothing from ../shared.
"""
import collections
import json
import logging
import random
import time
from types import SimpleNamespace

import pytest
from transformers import LlamaTokenizer
from transformers.tokenization_utils_sentencepiece import SPIECE_UNDERLINE, SentencePieceBackend

from stllava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from stllava.data.preprocess import make_sq_rng, preprocess
from stllava.mm_utils import tokenizer_image_token

# Copied by hand from docs/Method.md#templates.
VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the user's questions.")
LLAVA = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
         "helpful, detailed, and polite answers to the human's questions.")
SQ = (VICUNA + "Also, the artificial intelligence assistant is a curious virtual user. The virtual user "
      "asks complex questions that are relevant to the content in the image, for example, asking about "
      "background knowledge of the objects in the image, asking to discuss about events happening in the "
      "image, etc. Again, do not ask about uncertain details.")
SYSTEMS = {"v1": VICUNA, "vicuna_v1": VICUNA, "llava_v1": LLAVA, "v1_sq": SQ}
EOS = 2


class SlowLlamaTokenizer(SentencePieceBackend):
    """The transformers 4.3x slow ``LlamaTokenizer`` (SentencePiece) tokenization rules.

    legacy=True: every text segment (also after a special token) gets SentencePiece's dummy prefix.
    legacy=False: only the start of the text gets a "▁"; after ``</s>`` no prefix is added.
    """

    def __init__(self, vocab_file, legacy):
        super().__init__(vocab_file=str(vocab_file), legacy=legacy, bos_token="<s>", eos_token="</s>",
                         unk_token="<unk>")

    def tokenize(self, text, **kwargs):
        if self.legacy or len(text) == 0:
            return super().tokenize(text, **kwargs)
        tokens = super().tokenize(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "), **kwargs)
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.all_special_tokens:
            tokens = tokens[1:]
        return tokens


# ---------------------------------------------------------------- data
TINY_QA = [
    ("Is there a mass in the left lung?", "Yes"), ("What imaging modality was used?", "CT"),
    ("Is the heart enlarged?", "No"), ("Where is the lesion located?", "right kidney"),
    ("Which plane is this image taken in?", "axial"), ("How many nodules are seen?", "2"),
    ("What is the size of the cyst?", "2.5 cm"), ("Is there evidence of pneumothorax?", "no"),
    ("What organ is shown?", "The brain."), ("Is this a T2-weighted MRI?", "yes"),
    ("What abnormality is seen in the liver?", "A hypodense lesion in the right lobe."),
    ("Are the ventricles dilated?", "Yes, there is hydrocephalus."),
    ("Can you describe the image in detail?", "An axial CT of the abdomen showing free air."),
    ("Is the aorta normal?", "There is an aneurysm of the abdominal aorta, about 5 cm."),
    ("What does the x-ray show?", "Bilateral pleural effusions"), ("Is the fracture acute?", "No."),
    ("Is there a hemorrhage?", "Yes; in the left frontal lobe (acute)."),
    ("What is the most likely diagnosis?", "pneumonia"), ("Is the spleen enlarged?", "splenomegaly"),
    ("Where is the tumor?", "Posterior fossa, midline"),
]


def tiny_conversations(n=80):
    """``n`` image conversations of 1-4 turns from TINY_QA, the first question with "<image>\\n"."""
    convs = []
    for i in range(n):
        turns = [TINY_QA[(i * 7 + j) % len(TINY_QA)] for j in range(1 + i % 4)]
        src = []
        for j, (q, a) in enumerate(turns):
            src += [{"from": "human", "value": ("<image>\n" + q) if j == 0 else q}, {"from": "gpt", "value": a}]
        convs.append(src)
    return convs


@pytest.fixture(scope="session")
def vqa_rad_conversations(vqa_rad_dir):
    """Multi-turn conversations from the real VQA-RAD QAs: grouped by image, up to 4 QAs each."""
    records = json.loads((vqa_rad_dir / "VQA_RAD_Dataset_Public.json").read_text())
    by_image = collections.defaultdict(list)
    for r in records:
        by_image[r["image_name"]].append((str(r["question"]).strip(), str(r["answer"]).strip()))
    convs = []
    for image in sorted(by_image):
        qas = by_image[image]
        for c in range(0, len(qas), 4):
            src = []
            for j, (q, a) in enumerate(qas[c:c + 4]):
                src += [{"from": "human", "value": ("<image>\n" + q) if j == 0 else q},
                        {"from": "gpt", "value": a}]
            convs.append(src)
    assert len(convs) >= 200 and sum(len(s) > 2 for s in convs) >= 200
    return convs


# ---------------------------------------------------------------- tokenizers
@pytest.fixture(scope="session")
def tiny_tokenizers(tmp_path_factory):
    from stllava.model.tiny_tokenizer import build_tiny_tokenizer

    return {legacy: build_tiny_tokenizer(str(tmp_path_factory.mktemp(f"tiny{legacy}")), legacy=legacy)
            for legacy in (True, False)}


_REAL = {}


def real_tokenizer(path, kind, legacy):
    if (kind, legacy) not in _REAL:
        if kind == "hf":
            _REAL[kind, legacy] = LlamaTokenizer.from_pretrained(str(path.parent), legacy=legacy, add_bos_token=True)
        else:
            _REAL[kind, legacy] = SlowLlamaTokenizer(path, legacy)
    return _REAL[kind, legacy]


# ---------------------------------------------------------------- the independent check
def expected_prompt(version, src, vuser):
    """The prompt of docs/Method.md#self-questioning, built here by hand; ``vuser[t]`` says turn t is a VUSER question."""
    out = SYSTEMS[version] + " "
    for t, turn in enumerate(src):
        value = turn["value"]
        if t == 0 and "<image>" in value:
            value = "<image>\n" + value.replace("<image>", "").strip()
        if turn["from"] == "gpt":
            out += f"ASSISTANT: {value}</s>"
        elif vuser[t]:
            out += f"VUSER: {value}</s> "
        else:
            out += f"USER: {value} "
    return out


def trained_runs(labels):
    runs, cur = [], []
    for x in list(labels) + [IGNORE_INDEX]:
        if x != IGNORE_INDEX:
            cur.append(x)
        elif cur:
            runs.append(cur)
            cur = []
    return runs


def check_batch(convs, tok, version, has_image=True, sq_r=0.0, seed=0):
    """Run preprocess and verify every sample against the independent construction.

    Returns counts: samples, VUSER turns, trained and masked tokens.
    """
    out = preprocess(convs, tok, has_image, version, sq_r=sq_r, rng=random.Random(seed))
    assert out["mismatches"] == 0 and out["mismatch_records"] == []
    assert len(out["input_ids"]) == len(out["labels"]) == len(convs)
    draws = random.Random(seed)  # replays the documented draw order: human turns t > 0, in order
    stats = collections.Counter(samples=len(convs))
    for src, ids, labels in zip(convs, out["input_ids"], out["labels"]):
        ids, labels = ids.tolist(), labels.tolist()
        vuser = [turn["from"] == "vuser" or (version == "v1_sq" and has_image and sq_r > 0 and t > 0
                                             and turn["from"] == "human" and draws.random() < sq_r)
                 for t, turn in enumerate(src)]
        assert ids == tokenizer_image_token(expected_prompt(version, src, vuser), tok)
        assert ids.count(IMAGE_TOKEN_INDEX) == (1 if has_image else 0)
        assert len(labels) == len(ids)
        assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(labels, ids))
        assert labels[0] == IGNORE_INDEX and ids[0] == 1
        expected = [tok(turn["value"], add_special_tokens=False).input_ids + [EOS]
                    for t, turn in enumerate(src) if turn["from"] == "gpt" or vuser[t]]
        assert trained_runs(labels) == expected
        n_trained = sum(lab != IGNORE_INDEX for lab in labels)
        assert n_trained == sum(map(len, expected))
        stats["vuser"] += sum(vuser)
        stats["trained"] += n_trained
        stats["masked"] += len(labels) - n_trained
    return stats


# ---------------------------------------------------------------- real tokenizer, real data
@pytest.mark.parametrize("version", ["v1", "llava_v1", "v1_sq"])
@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "nonlegacy"])
@pytest.mark.parametrize("kind", ["hf", "slow"])
def test_real_tokenizer_vqa_rad_zero_mismatches(llama_tokenizer_path, vqa_rad_conversations, kind, legacy, version):
    tok = real_tokenizer(llama_tokenizer_path, kind, legacy)
    # Every 2nd (331) / 3rd (221) conversation: >= 200 multi-turn samples per case, under 60 s in all.
    convs = vqa_rad_conversations[::2] if kind == "hf" else vqa_rad_conversations[::3]
    assert len(convs) >= 200
    t0 = time.perf_counter()
    stats = check_batch(convs, tok, version, sq_r=0.5 if version == "v1_sq" else 0.0, seed=1234)
    logging.getLogger(__name__).info("%s legacy=%s %s: %s in %.1fs", kind, legacy, version, dict(stats),
                                     time.perf_counter() - t0)
    if version == "v1_sq":
        eligible = sum(len(s) // 2 - 1 for s in convs)
        assert 0.4 * eligible < stats["vuser"] < 0.6 * eligible  # sq_r = 0.5 really converts
    else:
        assert stats["vuser"] == 0
    assert stats["trained"] > 0 and stats["masked"] > stats["trained"]


def test_real_tokenizer_trained_counts_agree_across_modes(llama_tokenizer_path, vqa_rad_conversations):
    # Answers and questions tokenize alike in every mode (they follow a space, never a </s>), so the
    # trained token counts must agree across the four tokenizer modes; masked counts may not.
    convs = vqa_rad_conversations[::6]
    counts = {(kind, legacy): check_batch(convs, real_tokenizer(llama_tokenizer_path, kind, legacy), "v1_sq",
                                          sq_r=0.5, seed=7)
              for kind in ("hf", "slow") for legacy in (True, False)}
    assert len({(c["trained"], c["vuser"]) for c in counts.values()}) == 1
    # What the legacy modes change, all of it masked: after a </s>, "USER" is "▁US ER" in legacy mode
    # and "USER" otherwise (+1 per later USER turn); the old slow legacy mode also puts an extra "▁"
    # before " ASSISTANT" after a VUSER question's </s> (+1 per VUSER turn).
    vuser = counts["hf", True]["vuser"]
    later_user = sum(len(s) // 2 - 1 for s in convs) - vuser
    assert counts["hf", True]["masked"] - counts["hf", False]["masked"] == later_user
    assert counts["slow", True]["masked"] - counts["slow", False]["masked"] == later_user + vuser
    assert counts["hf", False]["masked"] == counts["slow", False]["masked"]


def test_reference_round_arithmetic_breaks_without_legacy(llama_tokenizer_path):
    """Why the boundaries are checked, not computed: the reference's round-by-round lengths
    (SQ-LLaVA ``preprocess_v1``, offsets -2) disagree with the real ids in legacy=False mode."""
    src = [{"from": "human", "value": "<image>\nIs this a CT?"}, {"from": "gpt", "value": "Yes"},
           {"from": "human", "value": "Is it normal?"}, {"from": "gpt", "value": "No"}]
    prompt = expected_prompt("v1", src, [False] * 4)
    for legacy, reference_ok in ((True, True), (False, False)):
        tok = real_tokenizer(llama_tokenizer_path, "hf", legacy)
        total, cur = len(tokenizer_image_token(prompt, tok)), 1
        for rou in prompt.split("</s>")[:-1]:
            cur += len(tokenizer_image_token(rou, tok))
        assert (cur == total) is reference_ok
        assert preprocess([src], tok, True, "v1")["mismatches"] == 0


# ---------------------------------------------------------------- golden label vectors (real tokenizer)
V1_SYSTEM_IDS = [319, 13563, 1546, 263, 12758, 1404, 322, 385, 23116, 21082, 20255, 29889, 450, 20255, 4076,
                 8444, 29892, 13173, 29892, 322, 1248, 568, 6089, 304, 278, 1404, 29915, 29879, 5155, 29889]
M = IGNORE_INDEX


@pytest.mark.parametrize("legacy", [True, False])
def test_golden_v1_labels(llama_tokenizer_path, legacy):
    # Pieces, checked by hand: <s> | ▁A ▁chat ▁between … ▁questions . | ▁US ER : ▁ <image> ▁ <0x0A> Is ▁this
    # ▁a ▁CT ? ▁A SS IST ANT : | ▁Yes </s>  — only "▁Yes </s>" is trained.
    tok = real_tokenizer(llama_tokenizer_path, "hf", legacy)
    src = [{"from": "human", "value": "<image>\nIs this a CT?"}, {"from": "gpt", "value": "Yes"}]
    out = preprocess([src], tok, True, "v1")
    ids = [1] + V1_SYSTEM_IDS + [3148, 1001, 29901, 29871, IMAGE_TOKEN_INDEX, 29871, 13, 3624, 445, 263, 26637,
                                 29973, 319, 1799, 9047, 13566, 29901, 3869, 2]
    assert out["input_ids"][0].tolist() == ids
    assert out["labels"][0].tolist() == [M] * 48 + [3869, 2]
    assert tok.convert_ids_to_tokens([3869, 2]) == ["▁Yes", "</s>"]


@pytest.mark.parametrize("kind,legacy,after_answer,after_question", [
    ("hf", True, [478], []),           # "▁V" USER
    ("hf", False, [29963], []),        # "V" USER: no prefix after </s>
    ("slow", True, [478], [29871]),    # and the old slow legacy mode's extra "▁" before ▁A SS IST ANT
    ("slow", False, [29963], []),
])
def test_golden_v1_sq_labels(llama_tokenizer_path, kind, legacy, after_answer, after_question):
    tok = real_tokenizer(llama_tokenizer_path, kind, legacy)
    src = [{"from": "human", "value": "<image>\nWhat organ?"}, {"from": "gpt", "value": "Brain"},
           {"from": "vuser", "value": "Is it normal?"}, {"from": "gpt", "value": "No"}]
    out = preprocess([src], tok, True, "v1_sq")
    ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
    system = tok(SQ, add_special_tokens=False).input_ids
    assert len(system) == 93 and system[:30] == V1_SYSTEM_IDS
    user = [3148, 1001, 29901, 29871, IMAGE_TOKEN_INDEX, 29871, 13, 5618, 2894, 29973]  # ▁US ER : ▁ img ▁ \n What ▁organ ?
    assistant = [319, 1799, 9047, 13566, 29901]  # ▁A SS IST ANT :
    brain, question, no = [5032, 262, 2], [1317, 372, 4226, 29973, 2], [1939, 2]  # ▁Bra in </s> | ▁Is ▁it ▁normal ? </s>
    vuser_tag = after_answer + [11889, 29901]  # (▁)V USER :
    tail = after_question + assistant
    assert ids == [1] + system + user + assistant + brain + vuser_tag + question + tail + no
    assert labels == ([M] * (1 + 93 + 10 + 5) + brain + [M] * 3 + question + [M] * len(tail) + no)


# ---------------------------------------------------------------- tiny tokenizer (no ../shared)
def test_tiny_tokenizer_is_deterministic_fast_and_llama_like(tmp_path):
    import sentencepiece as spm

    from stllava.model.tiny_tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer(str(tmp_path / "warm"))  # the first call pays for imports
    t0 = time.perf_counter()
    tok = build_tiny_tokenizer(str(tmp_path / "a"))
    assert time.perf_counter() - t0 < 5.0
    build_tiny_tokenizer(str(tmp_path / "b"))
    model_a, model_b = (tmp_path / "a" / "tokenizer.model").read_bytes(), (tmp_path / "b" / "tokenizer.model").read_bytes()
    assert model_a == model_b
    assert (tmp_path / "a" / "tokenizer_config.json").read_bytes() == (tmp_path / "b" / "tokenizer_config.json").read_bytes()

    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "a" / "tokenizer.model"))
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<0x00>"]  # byte fallback pieces
    assert sp.pad_id() == -1 and sp.piece_to_id("<pad>") == sp.unk_id()  # no pad piece
    assert sp.get_piece_size() == len(tok) == 1000
    assert tok.pad_token == "<unk>" and tok.pad_token_id == 0 and tok.model_max_length == 1024
    assert tok.tokenize("USER: Is there a pneumothorax? ASSISTANT: Yes VUSER:") == [
        "▁USER", ":", "▁Is", "▁there", "▁a", "▁pneumothorax", "?", "▁ASSISTANT", ":", "▁Yes", "▁VUSER", ":"]
    text = "USER: Is there a mass in the left lung? ASSISTANT: Yes, 2.5 cm. é 中"
    assert tok(text, add_special_tokens=False).input_ids == sp.encode(text)  # converted faithfully
    assert sp.unk_id() not in sp.encode("é 中 ∑")  # unseen characters fall back to bytes
    reloaded = LlamaTokenizer.from_pretrained(str(tmp_path / "a"))  # the folder carries the settings
    assert reloaded(text).input_ids == tok(text).input_ids and reloaded(text).input_ids[0] == 1
    assert reloaded.pad_token == "<unk>"


@pytest.mark.parametrize("version", ["v1", "vicuna_v1", "llava_v1", "v1_sq"])
@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "nonlegacy"])
def test_tiny_tokenizer_zero_mismatches(tiny_tokenizers, version, legacy):
    convs = tiny_conversations()
    stats = check_batch(convs, tiny_tokenizers[legacy], version, sq_r=0.5 if version == "v1_sq" else 0.0, seed=3)
    if version == "v1_sq":
        assert stats["vuser"] >= 30
    assert stats["trained"] > 0


def test_tiny_text_only_samples(tiny_tokenizers):
    convs = [[{"from": "human", "value": q}, {"from": "gpt", "value": a}] for q, a in TINY_QA[:10]]
    for version in ("v1", "v1_sq"):
        # sq_r > 0 without an image converts nothing (and needs no rng).
        out = preprocess(convs, tiny_tokenizers[False], False, version, sq_r=0.5)
        assert out["mismatches"] == 0
        stats = check_batch(convs, tiny_tokenizers[False], version, has_image=False, sq_r=0.5)
        assert stats["vuser"] == 0 and all(IMAGE_TOKEN_INDEX not in x for x in out["input_ids"])


def test_records_with_vuser_turns_are_honoured(tiny_tokenizers):
    tok = tiny_tokenizers[False]
    src = [{"from": "human", "value": "<image>\nWhat organ is shown?"}, {"from": "gpt", "value": "The brain."},
           {"from": "vuser", "value": "Is there a hemorrhage?"}, {"from": "gpt", "value": "No."}]
    stats = check_batch([src], tok, "v1_sq")
    assert stats["vuser"] == 1
    # A question already ending in </s> gets no second one.
    src2 = [dict(t) for t in src]
    src2[2]["value"] += "</s>"
    assert preprocess([src2], tok, True, "v1_sq")["input_ids"][0].tolist() == \
        preprocess([src], tok, True, "v1_sq")["input_ids"][0].tolist()
    with pytest.raises(ValueError, match="vuser"):
        preprocess([src], tok, True, "v1")


def test_sq_draws_reproducible_and_seed_dependent(tiny_tokenizers):
    tok, convs = tiny_tokenizers[False], tiny_conversations()
    a = preprocess(convs, tok, True, "v1_sq", sq_r=0.5, rng=random.Random(11))
    b = preprocess(convs, tok, True, "v1_sq", sq_r=0.5, rng=random.Random(11))
    c = preprocess(convs, tok, True, "v1_sq", sq_r=0.5, rng=random.Random(12))
    same = [x.tolist() == y.tolist() for x, y in zip(a["labels"], b["labels"])]
    assert all(same) and all(x.tolist() == y.tolist() for x, y in zip(a["input_ids"], b["input_ids"]))
    assert any(x.tolist() != y.tolist() for x, y in zip(a["input_ids"], c["input_ids"]))


def test_make_sq_rng_depends_only_on_seed_epoch_index():
    # Golden value: random.Random seeded with a str hashes it with SHA-512, so it is the same in every
    # process regardless of PYTHONHASHSEED (pytest does not fix it, so this would catch hash()).
    assert make_sq_rng(0, 0, 0).random() == 0.22130746677358248
    assert make_sq_rng(0, 0, 0).random() == make_sq_rng(0, 0, 0).random()
    assert len({make_sq_rng(0, 0, 1).random(), make_sq_rng(0, 1, 0).random(), make_sq_rng(1, 0, 0).random(),
                make_sq_rng(0, 0, 0).random()}) == 4


def test_sq_r_zero_gives_no_vuser(tiny_tokenizers):
    tok, convs = tiny_tokenizers[True], tiny_conversations()
    stats = check_batch(convs, tok, "v1_sq", sq_r=0.0)
    assert stats["vuser"] == 0
    out = preprocess(convs, tok, True, "v1_sq", sq_r=0.0)  # no rng needed: nothing is drawn
    vuser_ids = tok("VUSER:", add_special_tokens=False).input_ids
    assert not any(vuser_ids[-2:] == ids.tolist()[i:i + 2] for ids in out["input_ids"] for i in range(len(ids)))


def test_sq_r_one_converts_every_later_turn(tiny_tokenizers):
    stats = check_batch(tiny_conversations(), tiny_tokenizers[False], "v1_sq", sq_r=1.0)
    assert stats["vuser"] == sum(len(s) // 2 - 1 for s in tiny_conversations())


def test_sq_argument_errors(tiny_tokenizers):
    tok, convs = tiny_tokenizers[False], tiny_conversations(4)
    with pytest.raises(ValueError, match="rng"):
        preprocess(convs, tok, True, "v1_sq", sq_r=0.5)
    with pytest.raises(ValueError, match="sq_r"):
        preprocess(convs, tok, True, "v1_sq", sq_r=1.5, rng=random.Random(0))
    # Templates without a VUSER role ignore sq_r (the DPO script runs v1 with the default sq_r).
    assert check_batch(convs, tok, "v1", sq_r=0.5)["vuser"] == 0


def test_plain_template(tiny_tokenizers):
    tok = tiny_tokenizers[False]
    src = [{"from": "human", "value": "Describe the image.\n<image>"}, {"from": "gpt", "value": "A chest x-ray."}]
    out = preprocess([src], tok, True, "plain")
    caption = tok("A chest x-ray.\n", add_special_tokens=False).input_ids
    assert out["input_ids"][0].tolist() == [1, IMAGE_TOKEN_INDEX] + caption
    assert out["labels"][0].tolist() == [M, M] + caption
    assert out["mismatches"] == 0
    with pytest.raises(ValueError, match="plain"):
        preprocess([src + src], tok, True, "plain")
    with pytest.raises(ValueError, match="plain"):
        preprocess([src], tok, False, "plain")


# ---------------------------------------------------------------- errors and mismatch reporting
@pytest.mark.parametrize("roles", [["gpt", "human"], ["human", "human"], ["human", "gpt", "gpt", "human"],
                                   ["human", "gpt", "human"], ["human", "robot"]])
def test_bad_roles_name_the_record(tiny_tokenizers, roles):
    src = [{"from": r, "value": "<image>\nQ" if k == 0 else "text"} for k, r in enumerate(roles)]
    good = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]
    with pytest.raises(ValueError) as err:
        preprocess([good, src], tiny_tokenizers[False], True, "v1", record_ids=["id-a", "id-b"])
    msg = str(err.value)
    assert "'id-b'" in msg and str(roles) in msg and "alternate human/gpt starting with human" in msg


def test_bad_records_without_ids_use_the_batch_index(tiny_tokenizers):
    good = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]
    with pytest.raises(ValueError, match="record 1"):
        preprocess([good, [{"from": "gpt", "value": "A"}]], tiny_tokenizers[False], True, "v1")


@pytest.mark.parametrize("src,has_image,match", [
    ([{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], True, "no <image>"),
    ([{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}], False, "only allowed"),
    ([{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A <image>"}], True, "only allowed"),
    ([{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "  "}], True, "empty value"),
    ([], True, "non-empty"),
])
def test_bad_values_are_refused(tiny_tokenizers, src, has_image, match):
    with pytest.raises(ValueError, match=match):
        preprocess([src], tiny_tokenizers[False], has_image, "v1")


def test_unknown_version(tiny_tokenizers):
    with pytest.raises(ValueError, match="v1_sq"):
        preprocess(tiny_conversations(1), tiny_tokenizers[False], True, "v2")


class MergingTokenizer:
    """A character tokenizer that merges ": " into one token. Unlike SentencePiece it is not
    prefix-stable at a space, so the span after "ASSISTANT:" cannot be located."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=True):
        ids, i = [], 0
        while i < len(text):
            if text.startswith("</s>", i):
                ids.append(2)
                i += 4
            elif text.startswith(": ", i):
                ids.append(3)
                i += 2
            else:
                ids.append(ord(text[i]) + 10)
                i += 1
        return SimpleNamespace(input_ids=([1] if add_special_tokens else []) + ids)


def test_mismatch_is_counted_blanked_and_reported(caplog):
    src = [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]
    with caplog.at_level(logging.WARNING, logger="stllava.data.preprocess"):
        out = preprocess([src, src], MergingTokenizer(), False, "v1", record_ids=["rec-7", "rec-8"])
    assert out["mismatches"] == 2 and out["mismatch_records"] == ["rec-7", "rec-8"]
    prompt = VICUNA + " USER: Q? ASSISTANT: A.</s>"
    assert out["input_ids"][0].tolist() == MergingTokenizer()(prompt).input_ids  # ids are kept
    assert set(out["labels"][0].tolist()) == {IGNORE_INDEX}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "rec-7" in warnings[0] and "tokenization mismatch" in warnings[0]
    n_full = len(out["input_ids"][0])
    assert f"{n_full} tokens" in warnings[0]


@pytest.mark.parametrize("kind,legacy,after_answer", [
    ("hf", True, [478]), ("hf", False, [29963]), ("slow", True, [478]), ("slow", False, [29963])])
def test_golden_vuser_turn_in_data_published_masking(llama_tokenizer_path, kind, legacy, after_answer):
    """``data_vuser_turns="published"``: a vuser turn of the data is rendered without ``</s>`` and
    masked like an instruction (the published preprocess); converted turns are unaffected."""
    tok = real_tokenizer(llama_tokenizer_path, kind, legacy)
    src = [{"from": "human", "value": "<image>\nWhat organ?"}, {"from": "gpt", "value": "Brain"},
           {"from": "vuser", "value": "Is it normal?"}, {"from": "gpt", "value": "No"}]
    out = preprocess([src], tok, True, "v1_sq", data_vuser_turns="published")
    ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
    system = tok(SQ, add_special_tokens=False).input_ids
    user = [3148, 1001, 29901, 29871, IMAGE_TOKEN_INDEX, 29871, 13, 5618, 2894, 29973]  # ▁US ER : ▁ img ▁ \n What ▁organ ?
    assistant = [319, 1799, 9047, 13566, 29901]  # ▁A SS IST ANT :
    brain, question, no = [5032, 262, 2], [1317, 372, 4226, 29973], [1939, 2]  # no </s> after the question
    vuser_tag = after_answer + [11889, 29901]  # (▁)V USER :
    assert ids == [1] + system + user + assistant + brain + vuser_tag + question + assistant + no
    assert labels == [M] * (1 + 93 + 10 + 5) + brain + [M] * (len(vuser_tag) + 4 + 5) + no
    assert out["mismatches"] == 0
    # the rendered text is the published one: "VUSER: Q ASSISTANT: A</s>"
    assert tok.decode(ids[1 + 93 + 10 + 5 + 3:]).endswith("VUSER: Is it normal? ASSISTANT: No</s>")
    # default ("train"): the same record trains the question with its </s> (test_golden_v1_sq_labels)
    default = preprocess([src], tok, True, "v1_sq")
    assert default["input_ids"][0].tolist() != ids
    assert [t for t in default["labels"][0].tolist() if t != M] == brain + question + [2] + no
    # a question already ending in </s> loses it in the published mode (the published code would
    # have blanked the whole sample with a "tokenization mismatch")
    src2 = [dict(t) for t in src]
    src2[2]["value"] += "</s>"
    assert preprocess([src2], tok, True, "v1_sq", data_vuser_turns="published")["input_ids"][0].tolist() == ids
