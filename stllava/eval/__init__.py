"""Evaluation (docs/Evaluation.md): raw benchmarks → test files (`convert`), LLaVA-Med scoring
(`metrics`), run comparison tables and charts (`report`); `model_vqa` answers the questions."""
