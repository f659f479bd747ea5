"""stllava.generation: batched generation whose outputs do not depend on the batch."""
import os
import subprocess
import sys
import threading

import pytest
import torch
from PIL import Image

from stllava.generation import (
    GenerationSettings,
    ImageError,
    PerRowSampler,
    batched,
    clean_output,
    derive_seed,
    generate,
    image_prompt_text,
    left_pad,
    load_rgb,
    prefetch,
    prepare_batch,
    render_prompt,
)
from stllava.mm_utils import process_images


# --- pure helpers ---------------------------------------------------------------------------
def test_derive_seed_is_stable_across_processes_and_hash_seeds():
    """The same parts give the same seed in every process (not Python's salted hash)."""
    parts = "(0, 'sub/img1.jpg', 3), (7, 'img#q2', 1), (0, 101), (0, '101')"
    code = f"from stllava.generation import derive_seed; print([derive_seed(*p) for p in [{parts}]])"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(h)}).stdout for h in (1, 2)}
    here = str([derive_seed(*p) for p in eval(f"[{parts}]")]) + "\n"
    assert outs == {here}
    # pinned: a new release must not change which seeds (hence which samples) an item gets
    assert derive_seed(0, "img.jpg", 3) == 1302305825937168011


def test_derive_seed_differs_per_part_and_is_in_range():
    seeds = [derive_seed(base, image, k) for base in (0, 1) for image in ("a.png", "b.png", "sub/a.png")
             for k in range(50)]
    assert len(set(seeds)) == len(seeds) == 300            # every (base, image, k) its own seed
    assert all(0 <= s < 2 ** 63 for s in seeds)            # fits torch.Generator.manual_seed
    assert derive_seed(0, "a", 1) != derive_seed(0, 1, "a")  # order matters
    assert derive_seed(0, "1") != derive_seed(0, 1)         # so does the type: "1" is not 1
    assert derive_seed(0, "a", "b") != derive_seed(0, "a\x1fb")  # no two part lists collide by joining
    torch.Generator().manual_seed(max(seeds))               # accepted as is


def test_left_pad_golden():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batched_and_clean_output():
    assert list(batched(range(5), 2)) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        list(batched([1], 0))
    assert clean_output("  Is it the liver?</s> ") == "Is it the liver?"
    assert clean_output(" a</s>b ") == "a</s>b"


def test_settings_validation():
    assert not GenerationSettings().do_sample and GenerationSettings(temperature=0.7).do_sample
    for bad in (dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5),
                dict(min_new_tokens=5, max_new_tokens=4), dict(temperature=1.0, num_beams=2)):
        with pytest.raises(ValueError):
            GenerationSettings(**bad)


def test_prompts_are_the_llava_templates():
    assert image_prompt_text(" What is <image>shown? ") == "<image>\nWhat is shown?"
    p = render_prompt("v1", [(0, image_prompt_text("Q?")), (1, None)])
    assert p.endswith(" USER: <image>\nQ? ASSISTANT:")
    sq = render_prompt("v1_sq", [(0, "<image>\nDescribe."), (1, "A liver."), (2, None)])
    assert sq.endswith(" USER: <image>\nDescribe. ASSISTANT: A liver.</s>VUSER:")


def test_per_row_sampler_rows_are_independent_of_the_batch():
    torch.manual_seed(0)
    scores = torch.randn(4, 50)
    seeds = [11, 22, 33, 44]
    kw = dict(temperature=1.2, top_k=20, top_p=0.95)
    full = PerRowSampler(seeds, **kw)(None, scores.clone())
    assert torch.all((full == 0).sum(1) == 1) and torch.isinf(full).sum() == 4 * 49
    picks = full.argmax(1)
    for i in range(4):  # each row alone, with only its own seed, draws the same tokens
        alone = PerRowSampler([seeds[i]], **kw)(None, scores[i:i + 1].clone())
        assert alone.argmax(1).item() == picks[i].item()
    # a second step continues each row's own stream; the global RNG plays no part
    s2 = PerRowSampler(seeds, **kw)
    s2(None, scores.clone())
    torch.manual_seed(123)
    second = s2(None, scores.clone()).argmax(1)
    r2 = PerRowSampler(seeds[2:3], **kw)
    r2(None, scores[2:3].clone())
    assert r2(None, scores[2:3].clone()).argmax(1).item() == second[2].item()
    # top_k=1 keeps only the arg-max: sampling degenerates to greedy
    assert PerRowSampler(seeds, temperature=1.0, top_k=1)(None, scores.clone()).argmax(1).tolist() == \
        scores.argmax(1).tolist()
    with pytest.raises(ValueError, match="3 seeds"):
        PerRowSampler(seeds[:3], **kw)(None, scores)


def test_prefetch_keeps_order_and_raises_at_the_failing_job():
    assert [r for _, r in prefetch(range(6), lambda x: x * x, depth=2)] == [0, 1, 4, 9, 16, 25]
    assert [r for _, r in prefetch(range(3), lambda x: x + 1, depth=0)] == [1, 2, 3]
    names = set()

    def prep(x):
        names.add(threading.current_thread().name)
        if x == 3:
            raise KeyError("job 3")
        return x

    got = []
    with pytest.raises(KeyError, match="job 3"):
        for _job, r in prefetch(range(6), prep):
            got.append(r)
    assert got == [0, 1, 2]
    assert all(n.startswith("stllava-prefetch") for n in names)


def test_load_rgb_names_the_problem(tmp_path):
    with pytest.raises(ImageError, match="missing image"):
        load_rgb(tmp_path / "nope.jpg")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="unreadable image"):
        load_rgb(tmp_path / "bad.png")
    Image.new("L", (5, 3), 7).save(tmp_path / "gray.png")
    assert load_rgb(tmp_path / "gray.png").mode == "RGB"


# --- with the tiny model --------------------------------------------------------------------
def _images(n):
    """n small non-square images, all different (the model's output depends on the image)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        arr = (torch.rand(40 + 7 * i, 60, 3, generator=g) * 255).to(torch.uint8).numpy()
        out.append(Image.fromarray(arr))
    return out


QUESTIONS = ["Is there a fracture?", "What organ is shown?", "Where is the lesion?",
             "Is this an MRI or a CT scan of the abdomen and pelvis?", "Is it normal?",
             "What is the modality?", "Which side?", "How many nodules are there?"]


def _prompts():
    return [render_prompt("v1", [(0, image_prompt_text(q)), (1, None)]) for q in QUESTIONS]


def test_prepare_batch_pads_left_and_preprocesses_like_training(loaded):
    tok, model, proc = loaded
    ims = _images(3)
    prompts = [_prompts()[3], _prompts()[0], _prompts()[3]]  # a long, a short, a long prompt
    b = prepare_batch(tok, proc, model.config, prompts, [ims[0], ims[1], ims[0]])
    assert b.input_ids.shape[0] == 3 and b.attention_mask[:, -1].all()
    lengths = b.attention_mask.sum(1).tolist()
    assert lengths[1] < lengths[0] == lengths[2] == b.input_ids.shape[1]
    pad = lengths[0] - lengths[1]  # the short prompt is padded on the LEFT with unk, masked
    assert b.input_ids[1, :pad].tolist() == [tok.unk_token_id] * pad and b.attention_mask[1, :pad].sum() == 0
    assert b.input_ids[1, pad].item() == tok.bos_token_id
    assert model.config.image_aspect_ratio == "pad"
    want = process_images([ims[0], ims[1], ims[0]], proc, model.config)  # pad-to-square path
    assert torch.equal(b.pixel_values, want)
    with pytest.raises(ValueError, match="1 <image> token"):
        prepare_batch(tok, proc, model.config, prompts[:1], [[ims[0], ims[1]]])
    with pytest.raises(ValueError, match="2 prompts but 1"):
        prepare_batch(tok, proc, model.config, prompts[:2], [ims[0]])


@pytest.mark.parametrize("settings", [
    GenerationSettings(max_new_tokens=12, min_new_tokens=12),
    GenerationSettings(max_new_tokens=12, temperature=1.2, top_k=300, top_p=0.95),
], ids=["greedy", "sampled"])
def test_outputs_identical_between_batch_sizes_1_and_8(loaded, settings):
    tok, model, proc = loaded
    prompts, ims = _prompts(), _images(8)
    seeds = [derive_seed(0, i) for i in range(8)]
    together = generate(model, tok, proc, prompts, ims, settings, seeds)
    alone = [generate(model, tok, proc, [p], [im], settings, [s])[0] for p, im, s in zip(prompts, ims, seeds)]
    assert together == alone
    assert all(together) and len(set(together)) >= 6  # real, mostly distinct outputs: the test can fail
    rev = generate(model, tok, proc, prompts[::-1], ims[::-1], settings, seeds[::-1])
    assert rev[::-1] == together  # nor does the position in the batch matter


def test_sampling_follows_the_seed_only(loaded):
    tok, model, proc = loaded
    prompts, ims = _prompts()[:2] * 2, _images(2) * 2
    st = GenerationSettings(max_new_tokens=10, temperature=1.2, top_k=300, top_p=0.95)
    torch.manual_seed(1)
    a = generate(model, tok, proc, prompts, ims, st, [1, 2, 1, 3])
    torch.manual_seed(2)  # the global RNG has no say
    b = generate(model, tok, proc, prompts, ims, st, [1, 2, 1, 3])
    assert a == b
    assert a[0] == a[2] and a[0] != generate(model, tok, proc, prompts[:1], ims[:1], st, [5])[0]
    with pytest.raises(ValueError, match="one seed per prompt"):
        generate(model, tok, proc, prompts, ims, st)


def test_bench_generation_times_the_tool_and_checks_the_answers(tiny_bundle, tmp_path):
    """scripts/bench_generation.py, tiny settings: both ratios, equal answers, and the image counts
    that decide the end-to-end ratio (file order shares images within a batch, spread order none)."""
    import importlib.util
    import json

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench_generation.py")
    spec = importlib.util.spec_from_file_location("bench_generation", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    common = ["--model-path", tiny_bundle["model"], "--questions", "6", "--batch-size", "3", "--new-tokens", "2",
              "--repeats", "1"]
    res = bench.main(common + ["--json", str(tmp_path / "file.json")])
    assert res == json.loads((tmp_path / "file.json").read_text())
    assert res["batched_equals_single"] is True
    assert res["images_prepared"] == {"single": 6, "batched": 3}  # images: 19605 19605 16174 | 16174 ×3
    assert all(res[k]["ratio"] > 0 and res[k]["cpu_ratio"] > 0 for k in ("generation", "end_to_end"))
    spread = bench.main(common + ["--order", "spread"])
    assert spread["batched_equals_single"] is True and spread["images_prepared"] == {"single": 6, "batched": 6}
    assert bench.spread_order([{"i": "a"}, {"i": "a"}, {"i": "b"}, {"i": "c"}], "i") == \
        [{"i": "a"}, {"i": "b"}, {"i": "c"}, {"i": "a"}]


def test_bench_generation_test_set_order_shuffles_the_whole_test_set(tiny_bundle, tmp_path, vqa_rad_dir):
    """scripts/bench_generation.py --order test-set, tiny settings: the shuffled VQA-RAD test set
    (consecutive questions rarely share an image), both ratios and their quotient; skipped with
    the reason when the folder is absent."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench_generation.py")
    spec = importlib.util.spec_from_file_location("bench_generation", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main(["--model-path", tiny_bundle["model"], "--order", "test-set", "--vqa-rad", str(vqa_rad_dir),
                      "--questions", "6", "--batch-size", "3", "--new-tokens", "2", "--repeats", "1"])
    assert res["batched_equals_single"] is True and res["questions"] == 6
    assert res["distinct_images"] >= 5 and res["images_prepared"]["batched"] >= 5
    assert res["end_to_end_over_generation"] == res["end_to_end"]["ratio"] / res["generation"]["ratio"]
    skipped = bench.main(["--order", "test-set", "--vqa-rad", str(tmp_path)])
    assert skipped == {"skipped": f"{tmp_path}/testset.json not found (the shared VQA-RAD copy; give --vqa-rad DIR)"}
