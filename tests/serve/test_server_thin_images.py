"""A thin image (tiny on disk, gigapixels once padded to a square, issue 21) at the API server (a 400
from the shared image check) and in the chat CLI (one line)."""
import io

import pytest
from bad_files import write_thin_png
from PIL import Image

from stllava.serve import cli
from stllava.serve.inputs import ImageLimits, decode_image
from stllava.serve.protocol import APIError

THIN = ("1x40000 = aspect ratio 40,000:1, over the limit of 50:1 (padded to a square it would be 1,600,000,000 "
        "pixels); set STLLAVA_MAX_IMAGE_ASPECT to accept thinner images")


def _png(im):
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_the_server_answers_400(tmp_path):
    thin = tmp_path / "thin.png"
    write_thin_png(thin)
    with pytest.raises(APIError) as e:
        decode_image(thin.read_bytes(), ImageLimits(), "messages[0].content")
    assert e.value.status == 400 and e.value.param == "messages[0].content"
    assert e.value.message == f"messages[0].content: extreme aspect ratio ({THIN})"
    # under the server's pixel limit (40 M), but its padded square (7000 x 7000) is not
    with pytest.raises(APIError) as e:
        decode_image(_png(Image.new("1", (7000, 5000))), ImageLimits(), "messages[0].content")
    assert e.value.status == 400 and e.value.message == (
        "messages[0].content: image too large (7000x5000 pads to a 7000x7000 square = 49,000,000 pixels, over the "
        "limit of 40,000,000; set STLLAVA_MAX_IMAGE_PIXELS to accept larger images)")
    assert decode_image(_png(Image.new("L", (50, 1))), ImageLimits(), "m").size == (50, 1)  # 50:1 is accepted


def test_the_chat_cli_says_one_line(tmp_path):
    thin = tmp_path / "thin.png"
    write_thin_png(thin)
    with pytest.raises(cli.ChatInputError) as e:
        cli.load_image(str(thin))
    assert str(e.value) == f"--image-file {thin}: extreme aspect ratio ({THIN})"
