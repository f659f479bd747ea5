"""stllava.model.export_hf: a merged checkpoint becomes a transformers-native LLaVA that plain
transformers loads (AutoModelForImageTextToText + AutoProcessor) and that computes our logits."""
import os

import pytest
import torch
from checkpoint_factory import ASSET_IMAGE
from PIL import Image

from stllava.constants import IMAGE_TOKEN_INDEX
from stllava.generation import GenerationSettings, generate, image_prompt_text, render_prompt
from stllava.mm_utils import process_images, tokenizer_image_token
from stllava.model.builder import load_pretrained_model
from stllava.model.export_hf import chat_template, export

TURNS = ["What is shown in the image?", "A chest X-ray.", "Is there a nodule?"]


def conversation(image):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": TURNS[0]}]},
            {"role": "assistant", "content": [{"type": "text", "text": TURNS[1]}]},
            {"role": "user", "content": [{"type": "text", "text": TURNS[2]}]}]


def our_prompt():
    return render_prompt("v1", [(0, image_prompt_text(TURNS[0])), (1, TURNS[1]), (0, TURNS[2]), (1, None)])


@pytest.fixture(scope="module", params=["mlp2x_gelu", "linear"])
def exported(request, tmp_path_factory):
    from stllava.model.tiny import build_tiny_bundle

    root = tmp_path_factory.mktemp(request.param)
    src = build_tiny_bundle(str(root / "ckpt"), seed=3, projector_type=request.param)["model"]
    summary = export(src, str(root / "hf"))
    return src, summary


def test_exported_model_loads_in_plain_transformers_with_equal_logits(exported):
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    src, summary = exported
    tok, ours, proc, _ = load_pretrained_model(src, device="cpu")
    hf = AutoModelForImageTextToText.from_pretrained(summary["out"]).eval()
    processor = AutoProcessor.from_pretrained(summary["out"])
    assert isinstance(hf, LlavaForConditionalGeneration)

    image = Image.open(ASSET_IMAGE).convert("RGB").crop((0, 0, 300, 180))  # not square: the padding matters
    inputs = processor.apply_chat_template(conversation(image), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    ids = tokenizer_image_token(our_prompt(), tok, return_tensors="pt")[None]
    pixels = process_images([image], proc, ours.config)
    # the same sequence: each image token becomes the image's feature positions
    n = summary["image_seq_length"]
    expanded = sum(([summary["image_token_id"]] * n if i == IMAGE_TOKEN_INDEX else [i] for i in ids[0].tolist()), [])
    assert inputs["input_ids"][0].tolist() == expanded
    assert torch.equal(inputs["pixel_values"], pixels)
    with torch.no_grad():
        want = ours(input_ids=ids, images=pixels).logits
        got = hf(**inputs).logits
    vocab = want.shape[-1]
    assert got.shape == (1, want.shape[1], vocab + 1)
    torch.testing.assert_close(got[..., :vocab], want, atol=1e-4, rtol=0)
    assert torch.count_nonzero(got[..., vocab]) == 0  # the <image> token's output row is zero (and suppressed)

    # greedy generation gives the same text
    settings = GenerationSettings(max_new_tokens=12, min_new_tokens=12)
    ours_text = generate(ours, tok, proc, [our_prompt()], [image], settings)[0]
    out = hf.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    hf_text = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert hf_text == ours_text


def test_cluster_projector_is_refused_in_one_line(tiny_bundle, tmp_path, capsys):
    from stllava.errors import run_cli
    from stllava.model.export_hf import main

    code = run_cli(main, ["--model-path", tiny_bundle["model"], "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "'cluster' has no counterpart in transformers' LlavaForConditionalGeneration" in lines[0]
    assert "config.json" in lines[0] and "fix:" in lines[0]
    assert not (tmp_path / "hf").exists()


def test_chat_template_reproduces_our_token_ids_with_the_real_llama_tokenizer(llama_tokenizer_path):
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(str(llama_tokenizer_path.parent))
    image_id = len(tok)
    tok.add_tokens(["<image>"], special_tokens=True)
    text = tok.apply_chat_template(conversation(None), chat_template=chat_template("v1"), tokenize=False,
                                   add_generation_prompt=True)
    got = tok(text, add_special_tokens=False)["input_ids"]
    want = [image_id if i == IMAGE_TOKEN_INDEX else i for i in tokenizer_image_token(our_prompt(), tok)]
    assert got == want


def _snapshot(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, name))}


@pytest.mark.parametrize("where", ["same", "same_spelled_otherwise", "inside"])
def test_out_that_is_or_lies_in_the_model_path_is_refused_and_the_source_untouched(exported, tmp_path, capsys,
                                                                                    where):
    """Before: ``--out`` = ``--model-path`` wrote the export over the source and exited 0."""
    import shutil

    from stllava.errors import run_cli
    from stllava.model.export_hf import main

    src = str(tmp_path / "ckpt")
    shutil.copytree(exported[0], src, ignore=shutil.ignore_patterns("llm", "vision_tower"))
    before = _snapshot(src)
    out = {"same": src, "same_spelled_otherwise": os.path.join(src, "..", "ckpt") + "/",
           "inside": os.path.join(src, "hf")}[where]
    for extra in ([], ["--overwrite"]):
        assert run_cli(main, ["--model-path", src, "--out", out, *extra]) == 2
        err = capsys.readouterr().err
        what = "is inside an input folder" if where == "inside" else "is an input folder"
        assert err == f"error: --out {out} {what} ({src}); choose a new folder\n"
    assert _snapshot(src) == before and sorted(os.listdir(src)) == sorted(before)


def test_a_non_empty_out_is_refused_unless_overwrite(exported, capsys):
    from stllava.errors import run_cli
    from stllava.model.export_hf import main

    src, summary = exported
    out = summary["out"]
    before = _snapshot(out)
    assert run_cli(main, ["--model-path", src, "--out", out]) == 2
    assert capsys.readouterr().err == (f"error: --out {out} exists and is not empty; choose a new folder (or delete "
                                       "it first, or pass --overwrite to write over its files)\n")
    assert _snapshot(out) == before
    assert run_cli(main, ["--model-path", src, "--out", out, "--overwrite"]) == 0
    assert _snapshot(out).keys() == before.keys()
