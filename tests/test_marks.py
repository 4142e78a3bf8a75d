"""ViP-LLaVA visual prompts: pixel checks on synthetic images, parsing, and --box/--save-marked through `llava ask`."""

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from checkpoints import DATA
from llava_cli import marks
from llava_cli.cli import app
from llava_cli.errors import LlavaError
from llava_cli.marks import MarkError, draw, parse

WHITE, BLACK = (255, 255, 255), (0, 0, 0)
# alpha 128 of pure red over white and over black, as Image.alpha_composite rounds it
RED_ON_WHITE, RED_ON_BLACK = (255, 127, 127), (128, 0, 0)


def canvas(size=336, colour=WHITE) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def test_a_box_is_an_alpha_blended_outline_three_pixels_wide_at_the_anchor_size():
    out = draw(canvas(), [parse("box", "100,100,200,200")])
    assert out.mode == "RGB" and out.size == (336, 336)
    for x in (100, 101, 102):  # the left edge, drawn inwards from x1
        assert out.getpixel((x, 150)) == RED_ON_WHITE
    assert out.getpixel((103, 150)) == WHITE and out.getpixel((99, 150)) == WHITE
    assert out.getpixel((150, 150)) == WHITE  # inside: untouched
    assert out.getpixel((150, 100)) == RED_ON_WHITE and out.getpixel((200, 150)) == RED_ON_WHITE
    assert draw(canvas(colour=BLACK), [parse("box", "100,100,200,200")]).getpixel((100, 150)) == RED_ON_BLACK


@pytest.mark.parametrize("size,anchor,width", [(336, 336, 3), (672, 336, 6), (1000, 336, 8), (100, 336, 1), (768, 384, 6)])
def test_line_width_is_proportional_to_the_image_size(size, anchor, width):
    out = draw(canvas(size), [parse("box", "0.25,0.25,0.75,0.75")], anchor=anchor)
    left, mid = int(size * 0.25), size // 2
    row = [out.getpixel((x, mid)) for x in range(left, left + width + 1)]
    assert row == [RED_ON_WHITE] * width + [WHITE]


def test_fractions_and_pixels():
    assert parse("box", "0.25,0.25,0.75,0.75").fractions
    assert not parse("box", "0,0,1,1").fractions  # integers are pixels
    assert not parse("box", "10,0.5,200,240").fractions
    assert parse("box", "0.25,0.25,0.75,0.75").pixels((400, 200)) == (100, 50, 300, 150)
    assert parse("box", "200,240,10,20").coords == (10, 20, 200, 240)  # corners in either order


def test_colours_from_vip_llavas_training_palette_or_pillow():
    assert parse("point", "5,5").colour == (255, 0, 0)
    assert parse("point", "5,5:lime").colour == (0, 255, 0)
    assert parse("point", "5,5:Blue").colour == (0, 0, 255)
    assert parse("point", "5,5:#102030").colour == (16, 32, 48)
    out = draw(canvas(colour=BLACK), [parse("box", "10,10,100,100:blue")])
    assert out.getpixel((10, 50)) == (0, 0, 128)


def test_a_point_is_a_filled_dot_of_radius_eight_at_the_anchor_size():
    out = draw(canvas(), [parse("point", "168,168")])
    assert out.getpixel((168, 168)) == RED_ON_WHITE
    assert out.getpixel((168 + 7, 168)) == RED_ON_WHITE
    assert out.getpixel((168 + 10, 168)) == WHITE


def test_an_ellipse_is_an_outline_inside_its_box():
    out = draw(canvas(), [parse("ellipse", "68,68,268,268")])
    assert out.getpixel((168, 69)) == RED_ON_WHITE  # top of the ellipse
    assert out.getpixel((70, 70)) == WHITE  # the box's corner is outside the ellipse
    assert out.getpixel((168, 168)) == WHITE


def test_an_arrow_has_a_shaft_and_a_filled_head_at_its_tip():
    out = draw(canvas(), [parse("arrow", "300,168,100,168")])  # pointing left, tip at x=100
    assert out.getpixel((250, 168)) == RED_ON_WHITE  # shaft
    assert out.getpixel((101, 168)) == RED_ON_WHITE  # tip
    assert out.getpixel((108, 168 + 6)) == RED_ON_WHITE and out.getpixel((108, 168 - 6)) == RED_ON_WHITE  # head
    assert out.getpixel((250, 168 + 8)) == WHITE  # beside the shaft
    assert out.getpixel((90, 168)) == WHITE  # beyond the tip


def test_each_mark_is_blended_on_its_own_layer():
    one = draw(canvas(colour=BLACK), [parse("box", "10,10,100,100")])
    two = draw(canvas(colour=BLACK), [parse("box", "10,10,100,100"), parse("box", "10,10,100,100")])
    assert one.getpixel((10, 50)) == RED_ON_BLACK and two.getpixel((10, 50)) == (192, 0, 0)


def test_the_original_image_is_not_changed():
    img = canvas()
    draw(img, [parse("box", "1,1,50,50")])
    assert img.getpixel((1, 25)) == WHITE


@pytest.mark.parametrize("shape,spec,message", [
    ("box", "10,10,20", "expected x1,y1,x2,y2"),
    ("box", "a,b,c,d", "expected x1,y1,x2,y2"),
    ("point", "1,2,3", "expected x,y"),
    ("box", "10,10,10,50", "has no area"),
    ("arrow", "5,5,5,5", "the same point"),
    ("box", "1,1,9,9:mauvish", "unknown colour 'mauvish' (ViP-LLaVA was trained on red, lime, blue"),
])
def test_bad_specs_are_usage_errors(shape, spec, message):
    with pytest.raises(MarkError) as e:
        parse(shape, spec)
    assert message in str(e.value) and e.value.exit_code == 2


def test_marks_outside_the_image_are_refused():
    with pytest.raises(LlavaError, match=r"--box 10,10,900,50 falls outside the 336x336 image"):
        draw(canvas(), [parse("box", "10,10,900,50")])
    with pytest.raises(LlavaError, match="falls outside"):
        draw(canvas(), [parse("point", "-0.5,0.5")])


@pytest.fixture(scope="module")
def vip(tiny):
    return str(tiny("vipllava").folder)


def test_save_marked_writes_the_image_the_model_sees(vip, tmp_path):
    photo = DATA / "chelsea.png"
    saved = tmp_path / "marked.png"
    r = CliRunner().invoke(app, ["ask", str(photo), "What is in the red box?", "-m", vip, "--box", "0.2,0.2,0.6,0.7",
                                 "--point", "400,50:blue", "--save-marked", str(saved), "-n", "3", "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    assert r.stderr == ""  # a ViP-LLaVA checkpoint: no warning
    anchor = 56  # the tiny checkpoint's crop size: lines are as thick relative to it as to 336 on the real one
    expected = draw(Image.open(photo), [parse("box", "0.2,0.2,0.6,0.7"), parse("point", "400,50:blue")], anchor=anchor)
    assert Image.open(saved).convert("RGB").tobytes() == expected.tobytes()
    # the model is given the marked image: the answer is the one to the saved picture, not the one to the plain photo
    plain = CliRunner().invoke(app, ["ask", str(photo), "What is in the red box?", "-m", vip, "--json", "-n", "8", "--dtype", "float32"])
    marked = CliRunner().invoke(app, ["ask", str(saved), "What is in the red box?", "-m", vip, "--json", "-n", "8", "--dtype", "float32"])
    via_flag = CliRunner().invoke(app, ["ask", str(photo), "What is in the red box?", "-m", vip, "--json", "-n", "8", "--dtype", "float32",
                                        "--box", "0.2,0.2,0.6,0.7", "--point", "400,50:blue"])
    assert marked.exit_code == via_flag.exit_code == 0
    assert json.loads(via_flag.stdout)["answer"] == json.loads(marked.stdout)["answer"] != json.loads(plain.stdout)["answer"]


def test_marks_need_exactly_one_image_and_warn_on_other_families(tiny, vip, tmp_path):
    photo = str(DATA / "chelsea.png")
    r = CliRunner().invoke(app, ["ask", photo, photo, "Q", "-m", vip, "--box", "1,1,9,9"])
    assert r.exit_code == 2 and "need exactly one image; 2 were given" in r.stderr
    r = CliRunner().invoke(app, ["ask", "Q", "-m", vip, "--point", "1,1"])
    assert r.exit_code == 2 and "0 were given" in r.stderr
    r = CliRunner().invoke(app, ["ask", photo, "Q", "-m", str(tiny("qwen").folder), "--box", "1,1,9,9", "--show-prompt"])
    assert r.exit_code == 0 and "only ViP-LLaVA checkpoints were trained" in r.stderr
    r = CliRunner().invoke(app, ["ask", photo, "Q", "-m", vip, "--box", "1,1,9,9", "--save-marked", str(tmp_path / "x.nope")])
    assert r.exit_code == 1 and "unknown image extension" in r.stderr
    r = CliRunner().invoke(app, ["ask", photo, "Q", "-m", vip, "--box", "1,1,9"])
    assert r.exit_code == 2 and r.stderr.startswith("error: --box '1,1,9'")


def test_constants_are_vip_llavas():
    assert (marks.ANCHOR, marks.WIDTH, marks.ALPHA, marks.POINT_RADIUS) == (336, 3, 128, 8)
    assert set(marks.COLOURS) == {"red", "lime", "blue", "yellow", "fuchsia", "aqua", "orange", "purple", "gold"}
