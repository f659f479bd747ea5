"""Stage 2 -- the model makes its own preference data (docs/Method.md#stage-2).

questions (VUSER sampling) -> answers (two samples per question) -> ``judge`` (an OpenAI-compatible
vision model scores both answers; cached, resumable) -> ``build_pairs`` (the DPO training JSON).
(The local OpenAI-compatible stub that serves the demo's phantom judge is ``stllava.demo.openai_stub``.)
"""
