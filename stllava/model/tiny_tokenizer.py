"""A tiny LLaMA-like tokenizer, trained locally in about a second (no downloads).

It stands in for the Vicuna-7B-v1.5 tokenizer in tests, the demo and smoke runs. It is trained the
way LLaMA's was (SentencePiece BPE, byte fallback, digits split, whitespace-only pieces allowed,
identity normalisation, a dummy prefix, unk/bos/eos = 0/1/2, no pad piece) on a small embedded
medical-flavoured corpus, so prompts of every conversation template tokenize into sensible pieces
and the label masks behave as they do on the real tokenizer.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import os

import sentencepiece as spm
from transformers import LlamaTokenizer

from stllava.conversation import LLAVA_SYSTEM, SQ_SYSTEM, VICUNA_SYSTEM

logger = logging.getLogger(__name__)

DEFAULT_VOCAB_SIZE = 1000
DEFAULT_MODEL_MAX_LENGTH = 1024

# Vocabulary for the generated corpus. Order matters only for determinism (it is fixed).
_MODALITIES = ["CT", "MRI", "x-ray", "chest x-ray", "ultrasound", "PET", "angiogram", "mammogram",
               "T1-weighted MRI", "T2-weighted MRI", "FLAIR", "contrast-enhanced CT", "radiograph"]
_ORGANS = ["brain", "lung", "lungs", "heart", "liver", "kidney", "kidneys", "spleen", "pancreas",
           "bladder", "colon", "stomach", "aorta", "spine", "pelvis", "abdomen", "chest", "head",
           "neck", "gallbladder", "trachea", "ventricles", "bowel", "diaphragm", "mediastinum"]
_FINDINGS = ["mass", "lesion", "nodule", "fracture", "effusion", "pneumothorax", "hemorrhage",
             "edema", "infarct", "calcification", "cyst", "tumor", "abscess", "opacity",
             "consolidation", "atelectasis", "cardiomegaly", "aneurysm", "stenosis", "obstruction",
             "enlargement", "metastasis", "hydrocephalus", "pneumonia", "free air", "fluid"]
_SIDES = ["left", "right", "bilateral", "upper", "lower", "anterior", "posterior", "medial",
          "lateral", "midline"]
_PLANES = ["axial", "coronal", "sagittal", "PA", "AP", "lateral"]
_ADJECTIVES = ["normal", "abnormal", "large", "small", "enlarged", "hyperdense", "hypodense",
               "hyperintense", "hypointense", "round", "irregular", "well-defined", "acute",
               "chronic", "benign", "malignant", "mild", "severe", "diffuse", "focal"]
_QUESTIONS = [
    "Is there a {f} in the {o}?", "Is the {o} {a}?", "What imaging modality was used?",
    "Which plane is this image taken in?", "Where is the {f} located?", "What organ is shown?",
    "Is this a {m}?", "How many {f}s are seen?", "What is the size of the {f}?",
    "Is there evidence of {f}?", "What abnormality is seen in the {o}?", "Are the {o} {a}?",
    "Can you describe the image in detail?", "What does the {m} show?",
    "Is the {f} on the {s} side?", "What is the most likely diagnosis?",
]
_ANSWERS = [
    "Yes", "No", "yes", "no", "Yes.", "No.", "{m}", "{p}", "{s} {o}", "{a} {o}",
    "There is a {a} {f} in the {s} {o}.", "The {o} appears {a}.",
    "The image is a {p} {m} of the {o} showing a {f}.", "{n} cm", "{n}", "{f}",
    "The {f} is located in the {s} {o}, measuring about {n} cm.",
]
_EXTRA = [
    "USER: ASSISTANT: VUSER: USER ASSISTANT VUSER human gpt",
    "The patient is a {n}-year-old man with {f}. Findings: {a} {o}.",
    "Impression: no acute {f}. Comparison with prior {m} from {n} days ago.",
    "0 1 2 3 4 5 6 7 8 9 10 12 25 50 100 1.5 2.3 0.5 3 cm 5 mm",
    "one two three four five six seven eight nine ten none zero",
    "a an the of in on at with without and or is are was were this that there what which where how",
    "Question: Answer: Describe the image. Caption: Figure shows",
]
# Every printable ASCII character, so none needs the byte fallback (not formatted: holds braces).
_ASCII = [
    "<image> <im_start> <im_end> ! \" # $ % & ' ( ) * + , - . / : ; = > ? @ [ \\ ] ^ _ ` { | } ~",
    "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z a b c d e f g h i j k l m n o p q r s t u v w x y z",
]


def _corpus() -> list[str]:
    """Return the embedded training sentences (deterministic, ~3k lines)."""
    lines = [VICUNA_SYSTEM, LLAVA_SYSTEM, SQ_SYSTEM] + _ASCII * 3
    # Cycle through the word lists in lock-step so every word occurs in many contexts.
    cyc = zip(itertools.cycle(_MODALITIES), itertools.cycle(_ORGANS), itertools.cycle(_FINDINGS),
              itertools.cycle(_SIDES), itertools.cycle(_PLANES), itertools.cycle(_ADJECTIVES),
              itertools.cycle(range(1, 97)))
    for k, (m, o, f, s, p, a, n) in zip(range(600), cyc):
        fields = dict(m=m, o=o, f=f, s=s, p=p, a=a, n=n)
        q = _QUESTIONS[k % len(_QUESTIONS)].format(**fields)
        ans = _ANSWERS[k % len(_ANSWERS)].format(**fields)
        lines.append(f"USER: {q} ASSISTANT: {ans}")
        lines.append(f"VUSER: {q} ASSISTANT: {ans}")
        lines.append(_EXTRA[k % len(_EXTRA)].format(**fields))
        lines.append(ans)
    return lines


def train_tiny_sentencepiece(vocab_size: int = DEFAULT_VOCAB_SIZE) -> bytes:
    """Train the SentencePiece model on the embedded corpus; returns the serialized model bytes.

    Deterministic: one thread, no sampling or shuffling of the input, so the bytes are identical
    on every call. Refuses (sentencepiece raises) a vocab_size the corpus cannot fill.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, character_coverage=1.0, byte_fallback=True, split_digits=True,
        split_by_whitespace=True, split_by_unicode_script=True, split_by_number=True,
        allow_whitespace_only_pieces=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", num_threads=1,
        input_sentence_size=0, shuffle_input_sentence=False, max_sentencepiece_length=16,
        minloglevel=2,
    )
    return model.getvalue()


def build_tiny_tokenizer(out_dir: str, vocab_size: int = DEFAULT_VOCAB_SIZE,
                         model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
                         legacy: bool = False) -> LlamaTokenizer:
    """Train the tiny tokenizer, write ``tokenizer.model`` + ``tokenizer_config.json`` to ``out_dir``
    and return it loaded as a ``LlamaTokenizer`` (BOS added, pad = unk, like LLaVA's setup).

    ``legacy`` is stored as Vicuna-7B-v1.5 stores it (False). Same arguments, same file bytes.
    """
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(train_tiny_sentencepiece(vocab_size))
    config = {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "legacy": legacy, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<unk>", "model_max_length": model_max_length, "padding_side": "right",
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    # LlamaTokenizer(vocab_file=...) alone yields an empty vocabulary in transformers 5: load the
    # folder, which converts the SentencePiece model.
    tok = LlamaTokenizer.from_pretrained(out_dir, add_bos_token=True, legacy=legacy)
    tok.pad_token = tok.unk_token
    tok.model_max_length = model_max_length
    tok.padding_side = "right"
    if len(tok) != vocab_size or tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) != [0, 1, 2]:
        raise RuntimeError(f"tiny tokenizer in {out_dir} loaded wrongly: {len(tok)} pieces, "
                           f"specials {tok.convert_tokens_to_ids(['<unk>', '<s>', '</s>'])}")
    logger.info("tiny tokenizer (%d pieces) written to %s", len(tok), out_dir)
    return tok
