"""stllava — STLLaVA-Med (self-training LLaVA for medical VQA) on current libraries.

Pipeline: ``data`` → ``model`` → ``train`` (stage 1 SFT, stage 3 DPO) → ``selftrain`` (stage 2
preference data) → ``eval`` / ``serve``. ``python -m stllava.demo`` runs the whole loop on
embedded data; see README.md.
"""

__version__ = "0.1.0"
