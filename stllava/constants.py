"""Constants shared by every stage (docs/Method.md#constants)."""

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"

# Data records use these values of "from".
HUMAN, GPT, VUSER_FROM = "human", "gpt", "vuser"

LOGDIR = "."
