"""The demo's stages: each one calls the same command a researcher runs at 7B scale."""
from __future__ import annotations

import json
import logging
import os
import random
import sys

from stllava.demo.pipeline import STAGES, Pipeline, py, run
from stllava.jsonl import write_json_atomic

logger = logging.getLogger("stllava.demo")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JUDGE_KEY_ENV = "PHANTOM_JUDGE_KEY"
# The tiny model is trained, asked and evaluated with one template: v1_sq (the stage-1 template).
# A 7B LLaMA generalises across system prompts; a 200k-parameter one does not (measured: the SFT
# model scored 20% closed accuracy with the plain v1 system prompt, 82% with v1_sq's).
CONV = "v1_sq"


def stage_bundle(p: Pipeline) -> None:
    from stllava.model.tiny import build_tiny_bundle

    build_tiny_bundle(p.cfg.path("tiny"), seed=p.cfg.seed)


def stage_data(p: Pipeline) -> None:
    from stllava.demo.data import build_demo_data, vqa_rad_assets

    c = p.cfg
    s = build_demo_data(c.path("data"), c.n_train, c.n_unlabelled, c.n_test, seed=c.seed)
    run(py("stllava.eval.convert", "vqa_rad", "--src", os.path.join(vqa_rad_assets(), "vqa_rad_subset.json"),
           "--out", c.path("data", "eval_vqa_rad")), c, "convert_vqa_rad")
    logger.info("data: %d SFT records (%d phantom, %d VQA-RAD), %d unlabelled phantoms, %d phantom test "
                "questions (%d closed)", s["sft_records"], s["sft_phantom"], s["sft_vqa_rad"],
                s["unlabelled_images"], s["phantom_test_questions"], s["phantom_test_closed"])


def _train_cmd(p: Pipeline, module_path: str, module: str) -> list[str]:
    if p.cfg.sft_procs > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(p.cfg.sft_procs), os.path.join(REPO, module_path)]
    return py(module)


def _zero3_args(p: Pipeline) -> list[str]:
    return ["--deepspeed", os.path.join(REPO, "scripts", "zero3.json")] if p.cfg.sft_procs > 1 else []


def _trainable_args(lr: float) -> list[str]:
    """LoRA + ViT-LoRA + projector, one learning rate: the flags shared by the SFT and DPO stages."""
    lr = str(lr)
    return ["--mm_projector_type", "cluster", "--image_aspect_ratio", "pad",
            "--lora_enable", "True", "--lora_r", "64", "--lora_alpha", "128",
            "--vit_lora_enable", "--lora_r_vit", "16", "--lora_alpha_vit", "32",
            "--learning_rate", lr, "--mm_projector_lr", lr, "--vision_tower_lr", lr, "--weight_decay", "0.",
            "--warmup_ratio", "0.03", "--model_max_length", "512", "--dataloader_num_workers", "0",
            "--report_to", "none", "--disable_tqdm", "False"]


def _merge(p: Pipeline, adapter: str, base: str, out: str) -> None:
    """Merge a LoRA output folder into one full checkpoint with the user-facing merge script."""
    run([sys.executable, os.path.join(REPO, "scripts", "merge_lora_weights.py"), "--model-path", p.cfg.path(adapter),
         "--model-base", p.cfg.path(base), "--save-model-path", p.cfg.path(out), "--dtype", "float32"],
        p.cfg, adapter + "_merge")


def stage_sft(p: Pipeline) -> None:
    c = p.cfg
    threads = {"OMP_NUM_THREADS": "1"} if c.sft_procs > 1 else None
    run(_train_cmd(p, "stllava/train/train_sft.py", "stllava.train.train_sft") + _zero3_args(p) + [
        "--model_name_or_path", c.path("tiny"), "--version", CONV, "--sq_r", str(c.sft_sq_r),
        "--data_path", c.path("data", "sft.json"), "--image_folder", c.path("data", "sft_images"),
        "--group_by_modality_length", "True", "--lora_dropout_vit", "0.0",
        "--lr_scheduler_type", "constant_with_warmup", "--max_steps", str(c.sft_steps),
        "--per_device_train_batch_size", str(c.sft_batch // c.sft_procs), "--gradient_accumulation_steps", "1",
        "--logging_steps", "10", "--save_strategy", "steps", "--save_steps", str(c.sft_steps // 2),
        "--save_total_limit", "1", "--seed", str(c.seed), "--output_dir", c.path("sft")]
        + _trainable_args(c.sft_lr), c, "sft", threads)
    _merge(p, "sft", "tiny", "sft_merged")


def stage_questions(p: Pipeline) -> None:
    c = p.cfg
    os.makedirs(c.path("selftrain"), exist_ok=True)
    run(py("stllava.selftrain.questions", "--model-path", c.path("sft_merged"),
           "--image-folder", c.path("data", "phantoms", "unlabelled", "images"),
           "--out", c.path("selftrain", "questions.jsonl"), "--n-questions", str(c.n_questions),
           "--max-desc-tokens", "24", "--max-question-tokens", "24", "--batch-size", "16",
           "--temperature", str(c.q_temperature), "--top-k", str(c.q_top_k),
           "--seed", str(c.seed), "--dedup", "--device", "cpu"), c, "questions")


def stage_answers(p: Pipeline) -> None:
    c = p.cfg
    run(py("stllava.selftrain.answers", "--model-path", c.path("sft_merged"),
           "--questions", c.path("selftrain", "questions.jsonl"),
           "--image-folder", c.path("data", "phantoms", "unlabelled", "images"),
           "--out", c.path("selftrain", "answers.jsonl"), "--conv-mode", CONV, "--max-new-tokens", "12",
           "--temperature", str(c.a_temperature), "--top-k", str(c.a_top_k),
           "--batch-size", "32", "--seed", str(c.seed), "--device", "cpu"), c, "answers")


def stage_judge(p: Pipeline) -> None:
    from stllava.demo.phantom_judge import JUDGE_NAME, serve

    c = p.cfg
    images = c.path("data", "phantoms", "unlabelled", "images")
    server = serve(c.path("data", "phantoms", "unlabelled", "facts.json"), images)
    try:
        run(py("stllava.selftrain.judge", "--answers", c.path("selftrain", "answers.jsonl"),
               "--image-folder", images, "--out", c.path("selftrain", "judged.jsonl"),
               "--base-url", server.base_url, "--model", JUDGE_NAME, "--api-key-env", JUDGE_KEY_ENV,
               "--concurrency", "4", "--price-in", "0", "--price-out", "0"),
            c, "judge", {JUDGE_KEY_ENV: "local-phantom-judge"})
    finally:
        server.stop()


def stage_pairs(p: Pipeline) -> None:
    """Build pairs, then hold out a share of the *images* for the DPO reward-accuracy check."""
    c = p.cfg
    run(py("stllava.selftrain.build_pairs", "--judged", c.path("selftrain", "judged.jsonl"),
           "--out", c.path("selftrain", "dpo_all.json")), c, "build_pairs")
    pairs = json.load(open(c.path("selftrain", "dpo_all.json")))
    images = sorted({x["image"] for x in pairs})
    random.Random(c.seed).shuffle(images)
    held = set(images[: max(1, int(len(images) * c.heldout_share))])
    train = [x for x in pairs if x["image"] not in held]
    heldout = [x for x in pairs if x["image"] in held]
    write_json_atomic(c.path("selftrain", "dpo_train.json"), train, indent=1)
    write_json_atomic(c.path("selftrain", "dpo_heldout.json"), heldout, indent=1)
    logger.info("pairs: %d for DPO training, %d held out (%d images)", len(train), len(heldout), len(held))


def stage_dpo(p: Pipeline) -> None:
    """DPO from the merged SFT model, fresh LoRA + ViT-LoRA + projector, reference = the SFT model
    (adapters disabled, start projector); held-out pairs scored after training."""
    c = p.cfg
    run(py("stllava.train.train_dpo") + [
        "--model_name_or_path", c.path("sft_merged"), "--version", CONV,
        "--data_path", c.path("selftrain", "dpo_train.json"),
        "--eval_data_path", c.path("selftrain", "dpo_heldout.json"),
        "--image_folder", c.path("data", "phantoms", "unlabelled", "images"),
        "--lr_scheduler_type", "cosine", "--num_train_epochs", str(c.dpo_epochs),
        "--per_device_train_batch_size", str(c.dpo_batch),
        "--per_device_eval_batch_size", "256",  # one batch: accuracy over pairs, not batch means
        "--gradient_accumulation_steps", "1",
        "--dpo_beta", str(c.dpo_beta), "--dpo_loss_type", "sigmoid", "--ref_model", "adapter_disabled",
        "--logging_steps", "2", "--save_strategy", "no", "--seed", str(c.seed), "--output_dir", c.path("dpo")]
        + _trainable_args(c.dpo_lr), c, "dpo")
    _merge(p, "dpo", "sft_merged", "dpo_merged")


def stage_eval(p: Pipeline) -> None:
    c = p.cfg
    models = {"start": c.path("tiny"), "sft": c.path("sft_merged")}
    if os.path.isdir(c.path("dpo_merged")):
        models["dpo"] = c.path("dpo_merged")
    from stllava.demo.data import vqa_rad_assets

    sets = {"phantom": (c.path("data", "eval_phantom"), c.path("data", "phantoms", "test", "images")),
            "vqa_rad": (c.path("data", "eval_vqa_rad"), os.path.join(vqa_rad_assets(), "images"))}
    for name, model in models.items():
        for bench, (folder, images) in sets.items():
            out = c.path("eval", name, bench)
            os.makedirs(out, exist_ok=True)
            run(py("stllava.eval.model_vqa", "--model-path", model, "--question-file",
                   os.path.join(folder, "questions.jsonl"), "--image-folder", images,
                   "--answers-file", os.path.join(out, "answers.jsonl"), "--conv-mode", CONV,
                   "--max-new-tokens", str(c.eval_max_new_tokens), "--batch-size", "32", "--device", "cpu",
                   "--no-progress"), c, f"eval_{name}_{bench}")
            run(py("stllava.eval.metrics", "--gt", os.path.join(folder, "test.json"), "--pred",
                   os.path.join(out, "answers.jsonl"), "--out", out, "--benchmark", bench),
                c, f"metrics_{name}_{bench}")


def stage_report(p: Pipeline) -> None:
    from stllava.demo.report import write_report

    write_report(p)


STAGE_FUNCS = {name: globals()["stage_" + name] for name in STAGES}
