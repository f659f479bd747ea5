"""The LLaVA model: splice, forward/backward/generate, save/load, ViT-LoRA, config mapping."""
import json
import os

import pytest
import torch
from transformers import CLIPVisionConfig

from stllava.constants import IGNORE_INDEX
from stllava.constants import IMAGE_TOKEN_INDEX as IMG
from stllava.model import LlavaLlamaConfig, LlavaLlamaForCausalLM, load_llava_config
from stllava.model.tiny import TINY_LLM, TINY_VISION


def make_model(projector="cluster", seed=0, **over):
    torch.manual_seed(seed)
    v = CLIPVisionConfig(**TINY_VISION)
    cfg = LlavaLlamaConfig(**{**TINY_LLM, **over}, vocab_size=100, mm_vision_tower="/nonexistent/clip",
                           mm_vision_config=v.to_dict(), mm_hidden_size=v.hidden_size,
                           mm_projector_type=projector, mm_projector_clusters=64)
    return LlavaLlamaForCausalLM(cfg).eval()


def images(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 112, 112, generator=g)


def naive_splice(model, input_ids, attention_mask, labels, imgs):
    """Independent per-sample loop (LLaVA's original algorithm) for the vectorised splice."""
    feats = model.encode_images(imgs)
    embed = model.get_model().embed_tokens
    outs, labs, masks = [], [], []
    k = 0
    for b in range(input_ids.shape[0]):
        e, l, m = [], [], []
        for t in range(input_ids.shape[1]):
            tok = int(input_ids[b, t])
            if tok == IMG:
                e.append(feats[k])
                k += 1
                l += [IGNORE_INDEX] * feats.shape[1]
                m += [1] * feats.shape[1]
            else:
                e.append(embed(torch.tensor([tok])))
                l.append(int(labels[b, t]))
                m.append(int(attention_mask[b, t]))
        outs.append(torch.cat(e))
        labs.append(l)
        masks.append(m)
    L = max(len(x) for x in labs)
    E = torch.zeros(len(outs), L, feats.shape[2])
    LB = torch.full((len(outs), L), IGNORE_INDEX)
    M = torch.zeros(len(outs), L, dtype=torch.long)
    for b in range(len(outs)):
        n = len(labs[b])
        E[b, :n] = outs[b]
        LB[b, :n] = torch.tensor(labs[b])
        M[b, :n] = torch.tensor(masks[b])
    return E, M, LB


BATCH_IDS = torch.tensor([[1, 5, IMG, 7, 8, 0, 0, 0],
                          [1, 9, 10, 11, 12, 13, 14, 15],
                          [1, IMG, 20, 21, IMG, 22, 23, 0]])
BATCH_MASK = (torch.arange(8)[None] < torch.tensor([[5], [8], [7]])).long()


def test_vectorised_splice_matches_naive_loop():
    m = make_model()
    labels = BATCH_IDS.masked_fill(BATCH_MASK == 0, IGNORE_INDEX)
    imgs = images(3)  # one per <image> token, row-major
    with torch.no_grad():
        E, M, P, LB = m.prepare_inputs_labels_for_multimodal(BATCH_IDS, BATCH_MASK, labels, imgs)
        E2, M2, LB2 = naive_splice(m, BATCH_IDS, BATCH_MASK, labels, imgs)
    assert torch.allclose(E, E2, atol=1e-6)
    assert torch.equal(M, M2) and torch.equal(LB, LB2)
    assert E.shape[1] == 6 + 2 * 64  # longest sample: 6 text slots + 2 images of 8x8 patches
    # position ids count only attended tokens
    assert P[0, :4].tolist() == [0, 1, 2, 3] and P[0, 3 + 48].item() == 51


def test_image_count_mismatch_is_a_clear_error():
    m = make_model()
    with pytest.raises(ValueError, match=r"3 <image> tokens .*per sample: \[1, 0, 2\].* 2 images"):
        m.prepare_inputs_labels_for_multimodal(BATCH_IDS, BATCH_MASK, None, images(2))
    with pytest.raises(ValueError, match="no images"):
        m.prepare_inputs_labels_for_multimodal(BATCH_IDS, BATCH_MASK, None, None)


def test_forward_backward_mixed_batch_runs_tower_once():
    m = make_model().train()
    ids = BATCH_IDS.clone()
    ids[2, 4] = 30  # samples: image, text-only, image
    labels = ids.masked_fill((BATCH_MASK == 0) | (ids == IMG), IGNORE_INDEX)
    calls = []
    m.get_model().vision_tower.register_forward_hook(lambda *a: calls.append(a[1][0].shape[0]))
    out = m(input_ids=ids, attention_mask=BATCH_MASK, labels=labels, images=images(3))
    assert calls == [3]  # once, on every image of the batch (one per sample convention)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    proj_grad = [p.grad for p in m.get_model().mm_projector.parameters() if p.grad is not None]
    assert proj_grad and any(g.abs().sum() > 0 for g in proj_grad)
    assert m.model.embed_tokens.weight.grad is not None


def test_generate_batched_equals_single():
    m = make_model(seed=3)
    imgs = images(2, seed=5)
    p1 = torch.tensor([[1, 5, IMG, 7, 8]])
    p2 = torch.tensor([[1, 9, 10, IMG, 12, 13, 14]])
    g1 = m.generate(p1, images=imgs[:1], max_new_tokens=6, do_sample=False)
    g2 = m.generate(p2, images=imgs[1:], max_new_tokens=6, do_sample=False)
    batch = torch.tensor([[0, 0, 1, 5, IMG, 7, 8], [1, 9, 10, IMG, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    gb = m.generate(batch, images=imgs, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert gb.shape == (2, 6)
    assert gb[0].tolist() == g1[0].tolist()
    assert gb[1].tolist() == g2[0].tolist()


@pytest.mark.parametrize("projector", ["cluster", "mlp2x_gelu", "linear"])
def test_save_load_identical_logits(tmp_path, projector):
    m = make_model(projector)
    m.save_pretrained(tmp_path)
    m2 = LlavaLlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(m2.get_model().mm_projector) is type(m.get_model().mm_projector)
    ids = BATCH_IDS[:1]
    with torch.no_grad():
        a = m(input_ids=ids, attention_mask=BATCH_MASK[:1], images=images(1)).logits
        b = m2(input_ids=ids, attention_mask=BATCH_MASK[:1], images=images(1)).logits
    assert torch.equal(a, b)
    keys = set(m2.state_dict())
    assert any(k.startswith("model.mm_projector.") for k in keys)
    assert any(k.startswith("model.vision_tower.vision_tower.") for k in keys)


def test_vit_lora_receives_gradients_and_frozen_weights_stay():
    m = make_model().train()
    m.requires_grad_(False)
    tower = m.get_model().vision_tower
    tower.enable_lora(r=4, alpha=8, dropout=0.0)
    lora = {n: p for n, p in tower.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    # LoRA B starts at zero: give it a kick so A also gets a gradient, as after a few steps.
    frozen_before = {n: p.detach().clone() for n, p in tower.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in lora.items()}
    opt = torch.optim.SGD(lora.values(), lr=0.1)
    ids = BATCH_IDS[:1]
    labels = ids.masked_fill((BATCH_MASK[:1] == 0) | (ids == IMG), IGNORE_INDEX)
    out = m(input_ids=ids, attention_mask=BATCH_MASK[:1], labels=labels, images=images(1))
    out.loss.backward()
    opt.step()
    changed = [n for n, p in lora.items() if not torch.equal(p, lora_before[n])]
    assert any("lora_B" in n for n in changed), "ViT-LoRA weights got no gradient"
    for n, p in tower.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, frozen_before[n]), n


def test_released_llava_config_maps_to_ours_without_breaking_native(tmp_path):
    from transformers import AutoConfig, LlavaConfig

    raw = {"model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"], "hidden_size": 64,
           "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100,
           "rope_theta": 10000.0, "mm_vision_tower": "openai/clip-vit-large-patch14-336",
           "mm_hidden_size": 1024, "mm_projector_type": "cluster", "mm_vision_select_layer": -2,
           "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "use_mm_proj": True}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = load_llava_config(str(tmp_path))
    assert isinstance(cfg, LlavaLlamaConfig) and cfg.model_type == "llava_llama"
    assert cfg.mm_vision_tower == raw["mm_vision_tower"] and cfg.mm_hidden_size == 1024
    assert cfg.rope_parameters["rope_theta"] == 10000.0
    native = LlavaConfig()  # transformers' own LLaVA still works in the same process
    assert native.model_type == "llava"
    assert AutoConfig.for_model("llava").__class__ is LlavaConfig
    del raw["mm_hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="mm_hidden_size"):
        load_llava_config(str(tmp_path))


def test_native_llava_layout_is_refused_with_pointer(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": {}}))
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration"):
        load_llava_config(str(tmp_path))


def test_unknown_projector_names_choices():
    with pytest.raises(ValueError, match="mm_projector_type"):
        make_model("conv3x")


def test_tiny_bundle_loads_and_generates(tiny_bundle):
    from PIL import Image
    from transformers import CLIPImageProcessor, LlamaTokenizer

    from stllava.conversation import get_conv_template
    from stllava.mm_utils import process_images, tokenizer_image_token

    path = tiny_bundle["model"]
    for sub in ("llm", "vision_tower"):
        assert os.path.isfile(os.path.join(tiny_bundle[sub], "config.json"))
    model = LlavaLlamaForCausalLM.from_pretrained(path).eval()
    tok = LlamaTokenizer.from_pretrained(path)
    proc = CLIPImageProcessor.from_pretrained(path)
    conv = get_conv_template("v1")
    conv.append_message("USER", "<image>\nIs there a lesion?")
    conv.append_message("ASSISTANT", None)
    ids = tokenizer_image_token(conv.get_prompt(), tok, return_tensors="pt")[None]
    px = process_images([Image.new("RGB", (80, 60), (200, 10, 10))], proc, model.config)
    assert px.shape == (1, 3, 112, 112)
    out = model.generate(ids, images=px, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 4)
