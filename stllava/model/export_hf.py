"""Export a merged checkpoint to transformers' native LLaVA, the format vLLM, SGLang and TGI serve.

    python -m stllava.model.export_hf --model-path CKPT --out DIR [--conv-mode v1]

``DIR`` gets a ``LlavaForConditionalGeneration`` (``config.json``, ``model.safetensors``,
``generation_config.json``), the tokenizer with an ``<image>`` token, a ``LlavaProcessor`` whose
image processor pads to a square with the mean colour as stllava does, and a chat template that
renders the conversation template the model was trained with (``--conv-mode``, default: the
config's ``conv_mode``, else ``v1``). Load it with ``AutoModelForImageTextToText`` and
``AutoProcessor``.

Mapping: the LLaMA weights and the CLIP tower are copied as they are; an ``mlp2x_gelu`` projector is
transformers' two-layer projector (GELU); a ``linear`` (or ``mlp1x_gelu``) projector becomes its
first layer with an identity second layer and no activation. The ``<image>`` token gets id
``vocab_size`` (one more embedding row, never used: image features replace it; its output row is 0
and ``generation_config.json`` suppresses it). The cluster projector, deeper MLPs and ``identity``
have no native class: refused (ExportError, exit 2). Before returning, the export checks that
its processor and chat template give exactly stllava's token ids and pixel values for a sample
two-turn conversation, and refuses to finish otherwise.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

from stllava import logs
from stllava.errors import StllavaError, run_cli

logger = logging.getLogger(__name__)
IMAGE_TOKEN = "<image>"


class ExportError(StllavaError):
    """A checkpoint that cannot become a native transformers LLaVA, or an export that would not
    reproduce stllava's inputs."""


def projector_activation(projector_type: str, model_path: str) -> str:
    """transformers' ``projector_hidden_act`` for ``projector_type``; ExportError when none fits."""
    if projector_type == "mlp2x_gelu":
        return "gelu"
    if projector_type in ("linear", "mlp1x_gelu"):
        return "linear"
    raise ExportError(f"mm_projector_type {projector_type!r} has no counterpart in transformers' "
                      "LlavaForConditionalGeneration (it has one two-layer MLP projector), so no native "
                      "class can load it", file=os.path.join(model_path, "config.json"),
                      fix="export checkpoints trained with --mm_projector_type mlp2x_gelu or linear; "
                      "serve this one with python -m stllava.serve.api")


def chat_template(conv_mode: str) -> str:
    """A Jinja chat template rendering ``conv_mode`` exactly as :mod:`stllava.conversation` does.
    The text after ``<s>`` and after an image starts with a space: the SentencePiece word boundary
    that stllava's tokenization (each chunk between images tokenized on its own) puts there, which
    a tokenizer does not add after a special token."""
    from stllava.conversation import SeparatorStyle, get_conv_template

    conv = get_conv_template(conv_mode, "--conv-mode")
    if conv.sep_style is not SeparatorStyle.TWO:
        raise ExportError(f"template {conv_mode!r} is not a chat template (no roles)", fix="pass --conv-mode v1")
    q = json.dumps
    return (
        "{#- stllava conversation template '" + conv_mode + "' (stllava.model.export_hf) -#}\n"
        "{%- set ns = namespace(system=" + q(conv.system) + ", msgs=messages) -%}\n"
        "{%- if messages and messages[0]['role'] == 'system' -%}\n"
        "{%- set c = messages[0]['content'] -%}\n"
        "{%- set ns.system = c if c is string else (c | selectattr('type', 'equalto', 'text') "
        "| map(attribute='text') | join('')) -%}\n"
        "{%- set ns.msgs = messages[1:] -%}\n"
        "{%- endif -%}\n"
        "{{- bos_token + ' ' + ns.system + " + q(conv.sep) + " -}}\n"
        "{%- for m in ns.msgs -%}\n"
        "{%- set c = m['content'] -%}\n"
        "{%- if c is string -%}{%- set text = c -%}{%- set n = 0 -%}\n"
        "{%- else -%}\n"
        "{%- set text = c | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}\n"
        "{%- set n = c | selectattr('type', 'in', ['image', 'image_url']) | list | length -%}\n"
        "{%- endif -%}\n"
        "{%- if n > 0 -%}{%- set text = '<image> \\n' * n + (text | replace('<image>', '') | trim) -%}{%- endif -%}\n"
        "{{- (" + q(conv.roles[0]) + " if m['role'] == 'user' else " + q(conv.roles[1]) + ") + ': ' + text + ("
        + q(conv.sep) + " if loop.index0 % 2 == 0 else " + q(conv.sep2) + ") -}}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{- " + q(conv.roles[1] + ":") + " -}}{%- endif -%}\n")


def _llava_config(config, tower, image_token_id: int, act: str, dtype):
    from transformers import LlamaConfig, LlavaConfig

    ours = config.to_dict()
    text = {k: v for k, v in ours.items() if k in LlamaConfig().to_dict() and k not in ("architectures", "model_type")}
    text.update(vocab_size=image_token_id + 1, tie_word_embeddings=False)
    return LlavaConfig(
        vision_config=tower.config.to_dict(), text_config=LlamaConfig(**text).to_dict(),
        image_token_index=image_token_id, image_seq_length=tower.num_patches, projector_hidden_act=act,
        vision_feature_select_strategy="default" if tower.select_feature == "patch" else "full",
        vision_feature_layer=tower.select_layer, multimodal_projector_bias=True, tie_word_embeddings=False,
        dtype=dtype)


def _copy_weights(model, hf, act: str) -> None:
    """Our weights into ``hf`` (strict loads: every tensor has exactly one place)."""
    inner = model.get_model()
    lm = {k: v for k, v in inner.state_dict().items() if not k.startswith(("vision_tower.", "mm_projector."))}
    emb = lm["embed_tokens.weight"]
    lm["embed_tokens.weight"] = torch.cat([emb, emb.mean(0, keepdim=True)])  # the <image> row: never used
    hf.model.language_model.load_state_dict(lm, strict=True)
    hf.model.vision_tower.load_state_dict(inner.get_vision_tower().clip.state_dict(), strict=True)
    proj = inner.mm_projector
    first = proj[0] if isinstance(proj, torch.nn.Sequential) else proj
    hf.model.multi_modal_projector.linear_1.load_state_dict(first.state_dict())
    p2 = hf.model.multi_modal_projector.linear_2
    if act == "gelu":
        p2.load_state_dict(proj[2].state_dict())
    else:  # a single linear layer: the second layer passes its input through unchanged
        with torch.no_grad():
            p2.weight.copy_(torch.eye(p2.weight.shape[0], dtype=p2.weight.dtype))
            p2.bias.zero_()
    head = model.lm_head.weight
    hf.lm_head.load_state_dict({"weight": torch.cat([head, head.new_zeros(1, head.shape[1])])})


def _processor(ours, tokenizer, tower, conv_mode: str, aspect: str | None):
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    keep = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
            "do_normalize", "image_mean", "image_std", "do_convert_rgb")
    kwargs = {k: getattr(ours, k) for k in keep if getattr(ours, k, None) is not None}
    image_processor = LlavaImageProcessorPil(**kwargs, do_pad=aspect == "pad")
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=tower.config.patch_size,
                          vision_feature_select_strategy="default" if tower.select_feature == "patch" else "full",
                          chat_template=chat_template(conv_mode), image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=1)


def check_export(out: str, tokenizer, image_processor, config, conv_mode: str, image_token_id: int,
                 n_patches: int) -> None:
    """Refuse (ExportError) an export whose processor + chat template do not give stllava's token
    ids and pixel values for a sample two-turn conversation about a non-square image."""
    from PIL import Image
    from transformers import AutoProcessor

    from stllava.constants import IMAGE_TOKEN_INDEX
    from stllava.generation import image_prompt_text, render_prompt
    from stllava.mm_utils import process_images, tokenizer_image_token

    image = Image.linear_gradient("L").resize((96, 60)).convert("RGB")
    turns = ["What is shown in the image?", "A chest X-ray.", "Is there a nodule?"]
    prompt = render_prompt(conv_mode, [(0, image_prompt_text(turns[0])), (1, turns[1]), (0, turns[2]), (1, None)])
    want = []
    for i in tokenizer_image_token(prompt, tokenizer):
        want += [image_token_id] * n_patches if i == IMAGE_TOKEN_INDEX else [i]
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": turns[0]}]},
                {"role": "assistant", "content": [{"type": "text", "text": turns[1]}]},
                {"role": "user", "content": [{"type": "text", "text": turns[2]}]}]
    got = AutoProcessor.from_pretrained(out).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    if got["input_ids"][0].tolist() != want:
        raise ExportError("the exported chat template and tokenizer give other token ids than stllava for the same "
                          "conversation; the export would not reproduce the model's training format",
                          file=out, fix="report this checkpoint's tokenizer; serve it with stllava.serve.api")
    pixels = process_images([image], image_processor, config)
    if not torch.allclose(got["pixel_values"].float(), pixels.float(), atol=1e-5):
        raise ExportError("the exported image processor does not reproduce stllava's preprocessing", file=out)


def export(model_path: str, out: str, conv_mode: str | None = None, overwrite: bool = False) -> dict:
    """Write the native LLaVA folder ``out`` from the merged checkpoint ``model_path``; returns a
    summary (paths, image token id, projector, template). Refuses, before reading anything,
    an ``out`` that is ``model_path`` or lies inside it, and a non-empty ``out`` unless
    ``overwrite`` (:func:`stllava.model.merge.check_output_folder`, the merge's own check);
    then (ExportError) LoRA or projector-only folders (merge first), models without a vision
    tower, projectors without a native counterpart, and an export that fails :func:`check_export`."""
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    from stllava.model import checkpoint_layouts as cl
    from stllava.model.builder import load_pretrained_model
    from stllava.model.llava_llama import load_llava_config
    from stllava.model.merge import check_output_folder

    check_output_folder(out, model_path, flag="--out", overwrite=overwrite)

    try:
        layout = cl.detect_layout(model_path)
        config = load_llava_config(model_path)
    except (ValueError, OSError) as e:
        raise ExportError(str(e), fix="--model-path must be a merged stllava checkpoint folder") from None
    if layout.kind != "full" or layout.vit_lora:
        raise ExportError(f"this is a {layout.kind} layout{' with a ViT-LoRA' if layout.vit_lora else ''}, not a "
                          "merged checkpoint", file=model_path, fix="merge it first with python -m stllava.model.merge")
    if not getattr(config, "mm_vision_tower", None):
        raise ExportError("the checkpoint has no vision tower (no mm_vision_tower in its config)", file=model_path)
    act = projector_activation(config.mm_projector_type, model_path)
    conv_mode = conv_mode or getattr(config, "conv_mode", None) or "v1"
    dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    tokenizer, model, image_processor, _ = load_pretrained_model(model_path, device="cpu", dtype=dtype)
    tower = model.get_model().get_vision_tower()

    image_token_id = len(tokenizer)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != image_token_id:
        raise ExportError(f"the tokenizer already holds {IMAGE_TOKEN!r} at another id", file=model_path)
    hf = LlavaForConditionalGeneration(_llava_config(config, tower, image_token_id, act, dtype)).to(dtype).eval()
    _copy_weights(model, hf, act)
    hf.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, suppress_tokens=[image_token_id])
    os.makedirs(out, exist_ok=True)
    hf.save_pretrained(out)
    _processor(image_processor, tokenizer, tower, conv_mode, getattr(config, "image_aspect_ratio", None)
               ).save_pretrained(out)
    check_export(out, tokenizer, image_processor, config, conv_mode, image_token_id, tower.num_patches)
    summary = {"out": os.path.abspath(out), "image_token_id": image_token_id, "projector": config.mm_projector_type,
               "conv_mode": conv_mode, "image_seq_length": tower.num_patches, "dtype": str(dtype)}
    logger.info("exported %s → %s (%s)", model_path, out, summary)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", required=True, help="merged stllava checkpoint (mlp2x_gelu or linear projector)")
    ap.add_argument("--out", required=True, help="folder to write the transformers-native LLaVA to")
    ap.add_argument("--conv-mode", default=None, help="template for the chat template (default: config, else v1)")
    ap.add_argument("--overwrite", action="store_true",
                    help="write into a non-empty --out (its files of the same name are replaced); --out may never "
                         "be --model-path or lie inside it")
    logs.add_log_level_arg(ap)
    args = ap.parse_args(argv)
    logs.setup(args.log_level)
    summary = export(args.model_path, args.out, args.conv_mode, overwrite=args.overwrite)
    print(f"exported {args.model_path} to {summary['out']}: LlavaForConditionalGeneration, {summary['projector']} "
          f"projector, <image> = token {summary['image_token_id']}, template {summary['conv_mode']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
