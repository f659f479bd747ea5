#!/usr/bin/env bash
# Stage 3 (DPO) launch script — arrives with the DPO issue (#6).
echo "dpo_finetune.sh: the DPO stage is not implemented yet (issue #6)" >&2
exit 2
