"""Presets: the built-in files, precedence defaults < preset < environment < flags, user overrides, one-line errors."""

import json
from pathlib import Path

import pytest
import yaml

from checkpoints import DATA, HUBMETA
from llava_cli import presets
from llava_cli.cli import app
from llava_cli.config import LlavaConfig
from llava_cli.errors import LlavaError
from llava_cli.templates import template_for

PHOTO = str(DATA / "chelsea.png")
CHECKPOINTS = {  # preset -> the hub checkpoint it describes
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf", "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf",
    "vip-llava-7b": "llava-hf/vip-llava-7b-hf", "vip-llava-13b": "llava-hf/vip-llava-13b-hf",
    "interleave-qwen-0.5b": "llava-hf/llava-interleave-qwen-0.5b-hf",
    "interleave-qwen-7b": "llava-hf/llava-interleave-qwen-7b-hf",
}


@pytest.fixture
def config_home(tmp_path, monkeypatch):
    """An empty XDG config folder, so the user's own presets never leak into a test."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for var in presets.ENV.values():
        monkeypatch.delenv(var, raising=False)
    folder = tmp_path / "config" / "llava" / "presets"
    folder.mkdir(parents=True)
    return folder


def test_one_preset_per_supported_checkpoint_matching_its_config(config_home):
    found = presets.available()
    assert {n for n, p in found.items() if p.kind == "model"} == set(CHECKPOINTS)
    assert {n for n, p in found.items() if p.kind == "task"} == {"caption", "detailed", "ocr", "short-answer"}
    for name, repo in CHECKPOINTS.items():
        p = found[name]
        assert p.builtin and p.values["model"] == repo
        cfg = LlavaConfig.from_file(HUBMETA / repo.replace("/", "__") / "config.json")
        assert p.values["template"] == template_for(cfg.model_type, cfg.text.model_type, cfg.vision.model_type).name
        assert p.values["context_length"] == cfg.context_length
        assert {"dtype", "max_tokens", "temperature"} <= p.values.keys()
    for name in ("caption", "detailed", "ocr", "short-answer"):
        assert found[name].values["prompt"].strip()


def test_the_presets_ship_inside_the_package():
    folder = presets.builtin_dir()
    assert folder.parent.name == "llava_cli" and (folder / "caption.yaml").is_file()
    root = Path(__file__).resolve().parents[1] / "presets"  # the repository's view of the same folder
    assert root.resolve() == folder.resolve()


def _preset(tmp_path, **values) -> presets.Preset:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(values))
    return presets.read(path)


def test_layer_order_defaults_then_presets_then_environment_then_flags(tmp_path):
    defaults = dict(model="default-model", dtype="auto", max_tokens=512, temperature=0.0)
    first = _preset(tmp_path, model="preset-model", max_tokens=100, temperature=0.5)
    second = _preset(tmp_path, max_tokens=20)
    assert presets.layer(defaults, [], {}, {}) == defaults
    got = presets.layer(defaults, [first, second], {}, {})
    assert got == dict(model="preset-model", dtype="auto", max_tokens=20, temperature=0.5)  # later preset wins
    got = presets.layer(defaults, [first], {"LLAVA_MODEL": "env-model", "LLAVA_DTYPE": "float32"}, {})
    assert got["model"] == "env-model" and got["dtype"] == "float32" and got["max_tokens"] == 100
    got = presets.layer(defaults, [first], {"LLAVA_MODEL": "env-model"}, {"model": "flag-model", "max_tokens": 7})
    assert got["model"] == "flag-model" and got["max_tokens"] == 7 and got["temperature"] == 0.5


def test_precedence_through_the_command(runner, tiny, config_home, monkeypatch):
    llava, qwen = str(tiny("llava").folder), str(tiny("qwen").folder)
    (config_home / "mine.yaml").write_text(f"model: {llava}\nsystem: From the preset.\ndtype: float32\n")
    r = runner.invoke(app, ["ask", "Hi", "--preset", "mine", "--show-prompt"])
    assert r.exit_code == 0, r.output
    assert r.stdout == "From the preset. USER: Hi ASSISTANT:\n"  # the preset's model (llava-1.5) and system
    r = runner.invoke(app, ["ask", "Hi", "--preset", "mine", "--show-prompt", "-s", "From the flag."])
    assert r.stdout.startswith("From the flag. USER:")
    # LLAVA_MODEL beats the preset's model (with a warning) and -m beats LLAVA_MODEL
    r = runner.invoke(app, ["ask", "Hi", "--preset", "mine", "--show-prompt"], env={"LLAVA_MODEL": qwen})
    assert r.stdout.startswith("<|im_start|>system\n\nFrom the preset.") and "overrides the model of preset 'mine'" in r.stderr
    r = runner.invoke(app, ["ask", "Hi", "--preset", "mine", "--show-prompt", "-m", llava], env={"LLAVA_MODEL": qwen})
    assert r.stdout.startswith("From the preset. USER:") and "overrides" not in r.stderr
    # LLAVA_DTYPE beats the preset's dtype, --dtype beats LLAVA_DTYPE
    args = ["ask", "Hi", "--preset", "mine", "-n", "1", "--json"]
    assert json.loads(runner.invoke(app, args).stdout)["dtype"] == "float32"
    r = runner.invoke(app, args, env={"LLAVA_DTYPE": "bfloat16"})
    assert json.loads(r.stdout)["dtype"] == "bfloat16"
    r = runner.invoke(app, [*args, "--dtype", "float32"], env={"LLAVA_DTYPE": "bfloat16"})
    assert json.loads(r.stdout)["dtype"] == "float32"


def test_generation_settings_from_a_preset_and_flags_over_them(runner, tiny, config_home):
    qwen = str(tiny("qwen").folder)
    (config_home / "two.yaml").write_text("max_tokens: 2\ntemperature: 0.7\nseed: 3\n")
    rec = json.loads(runner.invoke(app, ["ask", "Hi", "-m", qwen, "--preset", "two", "--json"]).stdout)
    assert rec["tokens"]["generated"] <= 2 and rec["settings"]["temperature"] == 0.7 and rec["settings"]["seed"] == 3
    rec = json.loads(runner.invoke(app, ["ask", "Hi", "-m", qwen, "--preset", "two", "--json", "-n", "5", "-t", "0"]).stdout)
    assert rec["settings"]["temperature"] == 0.0 and rec["settings"]["seed"] == 3


def test_task_presets_give_the_question(runner, tiny, config_home):
    qwen = str(tiny("qwen").folder)
    r = runner.invoke(app, ["ask", PHOTO, "--preset", "caption", "-m", qwen, "--show-prompt"])
    assert r.exit_code == 0 and "<image>\nProvide a one-sentence caption for the provided image.<|im_end|>" in r.stdout
    r = runner.invoke(app, ["ask", PHOTO, "Mine?", "--preset", "caption", "-m", qwen, "--show-prompt"])
    assert "<image>\nMine?<|im_end|>" in r.stdout  # a question given replaces the preset's
    r = runner.invoke(app, ["ask", PHOTO, "What colour?", "--preset", "short-answer", "-m", qwen, "--show-prompt"])
    assert "What colour?\nAnswer the question using a single word or phrase.<|im_end|>" in r.stdout
    r = runner.invoke(app, ["ask", PHOTO, "--preset", "short-answer", "-m", qwen, "--show-prompt"])
    assert r.exit_code == 2 and "{question}" in r.stderr


def test_a_users_preset_replaces_the_builtin_one(runner, tiny, config_home):
    (config_home / "caption.yaml").write_text("prompt: My own caption prompt.\n")
    assert not presets.load("caption").builtin
    r = runner.invoke(app, ["ask", PHOTO, "--preset", "caption", "-m", str(tiny("qwen").folder), "--show-prompt"])
    assert "My own caption prompt." in r.stdout
    r = runner.invoke(app, ["presets"])
    assert r.exit_code == 0 and f"user: {config_home / 'caption.yaml'}" in r.stdout


def test_a_preset_file_by_path_and_a_relative_model_folder(runner, tiny, tmp_path, config_home):
    target = tmp_path / "models" / "tiny"
    target.parent.mkdir()
    target.symlink_to(tiny("llava").folder)
    (tmp_path / "models" / "here.yaml").write_text("model: ./tiny\n")
    r = runner.invoke(app, ["ask", "Hi", "--preset", str(tmp_path / "models" / "here.yaml"), "--show-prompt"])
    assert r.exit_code == 0 and r.stdout == "USER: Hi ASSISTANT:\n"


def test_context_length_of_a_preset_limits_the_prompt(runner, tiny, config_home):
    (config_home / "short.yaml").write_text("context_length: 20\n")
    r = runner.invoke(app, ["ask", PHOTO, "Hi", "--preset", "short", "-m", str(tiny("qwen").folder), "-n", "4"])
    assert r.exit_code == 1 and "the preset's context length is 20" in r.stderr


@pytest.mark.parametrize("text,message", [
    ("temprature: 0.2\n", "unknown key 'temprature' (allowed: description, model, template"),
    ("max_tokens: many\n", "'max_tokens' must be an integer >= 1, got 'many'"),
    ("max_tokens: true\n", "'max_tokens' must be an integer >= 1, got True"),
    ("top_p: 2\n", "'top_p' must be a number in (0, 1], got 2.0"),
    ("template: chatml\n", "'template' must be one of llava-1.5, vip-llava, interleave-qwen, got 'chatml'"),
    ("dtype: int8\n", "'dtype' must be one of auto, float32, bfloat16, float16, got 'int8'"),
    ("pad_square: 1\n", "'pad_square' must be true or false, got 1"),
    ("- a\n- b\n", "a preset is a mapping of settings (key: value), got list"),
    ("model: [unclosed\n", "invalid YAML at line"),
])
def test_a_bad_preset_is_one_line_naming_the_file_and_the_key(runner, config_home, text, message):
    path = config_home / "bad.yaml"
    path.write_text(text)
    with pytest.raises(LlavaError) as e:
        presets.load("bad")
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)
    r = runner.invoke(app, ["ask", "Hi", "--preset", "bad", "--show-prompt"])
    assert r.exit_code == 1 and r.stdout == "" and r.stderr.count("\n") == 1 and message in r.stderr


def test_unknown_preset_names_the_known_ones(runner, config_home):
    r = runner.invoke(app, ["ask", "Hi", "--preset", "nope"])
    assert r.exit_code == 1 and "unknown preset 'nope'" in r.stderr and "caption" in r.stderr
    r = runner.invoke(app, ["ask", "Hi", "--preset", "./missing.yaml"])
    assert r.exit_code == 1 and "preset file './missing.yaml' not found" in r.stderr


def test_presets_command_lists_and_shows(runner, config_home):
    r = runner.invoke(app, ["presets"])
    assert r.exit_code == 0
    assert [line.split()[0] for line in r.stdout.splitlines()] == list(presets.available())
    r = runner.invoke(app, ["presets", "vip-llava-7b"])
    assert r.exit_code == 0 and "model: llava-hf/vip-llava-7b-hf" in r.stdout and "template: vip-llava" in r.stdout
    shown = yaml.safe_load(r.stdout)  # what it prints reads back as the same settings
    assert shown == presets.load("vip-llava-7b").values
    records = json.loads(runner.invoke(app, ["presets", "--json"]).stdout)
    assert {r["name"] for r in records} == set(presets.available())
    one = json.loads(runner.invoke(app, ["presets", "ocr", "--json"]).stdout)
    assert one["kind"] == "task" and one["builtin"] and one["settings"]["prompt"]


def test_chat_takes_presets_too(runner, tiny, config_home):
    qwen = str(tiny("qwen").folder)
    (config_home / "chatty.yaml").write_text(f"model: {qwen}\nmax_tokens: 3\ndtype: float32\n")
    by_preset = runner.invoke(app, ["chat", PHOTO, "--preset", "chatty"], input="What is it?\n")
    by_flags = runner.invoke(app, ["chat", PHOTO, "-m", qwen, "-n", "3", "--dtype", "float32"], input="What is it?\n")
    assert by_preset.exit_code == by_flags.exit_code == 0, by_preset.output
    assert by_preset.stdout == by_flags.stdout and by_preset.stdout.strip()
    longer = runner.invoke(app, ["chat", PHOTO, "--preset", "chatty", "-n", "12"], input="What is it?\n")
    flags = runner.invoke(app, ["chat", PHOTO, "-m", qwen, "-n", "12", "--dtype", "float32"], input="What is it?\n")
    assert longer.stdout == flags.stdout  # the flag beat the preset's max_tokens
    r = runner.invoke(app, ["chat", "--preset", "nope"], input="Hi\n")
    assert r.exit_code == 1 and "unknown preset 'nope'" in r.stderr
