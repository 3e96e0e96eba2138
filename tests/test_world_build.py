"""The world builder end to end on the `tiny` preset: the real code path (GGUF conversion, vision side, target
assembly, vLLM answers, teacher-forced data, stage 1, stage 2, blind EAGLE, manifest) at toy sizes, for both LM
layouts the presets use: SmolLM2-like (llama, tied embeddings; `small`) and Qwen2.5-like (qwen2, untied head,
vocabulary padded past the tokenizer, q/k/v biases; `full`), the Qwen2.5-like one with answers generated in
bfloat16 as `full` does."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

pytest.importorskip("gguf", reason="the `gguf` package (train extra) is needed to write the tiny GGUF")

from tiny_gguf import write_tiny_gguf  # noqa: E402

from vispec_vllm.world.build import build_world  # noqa: E402
from vispec_vllm.world.presets import PRESETS  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module", params=[("llama", "float32"), ("qwen2", "bfloat16")], ids=["llama", "qwen2-bf16"])
def tiny_world(request, tmp_path_factory):
    architecture, answer_dtype = request.param
    root = tmp_path_factory.mktemp("worlds")
    lm = write_tiny_gguf(root / "tiny-lm.gguf", architecture, context_length=2048)
    log: list[str] = []
    preset = dataclasses.replace(PRESETS["tiny"], answer_dtype=answer_dtype)
    world = build_world(preset, root, lm_path=lm.gguf_path, progress=False, log=log.append)
    return world, lm, log


def test_every_step_ran_and_the_manifest_hashes_every_artifact(tiny_world):
    world, _, log = tiny_world
    assert not any(line.endswith("cached") for line in log), log
    manifest = json.loads(world.paths.manifest.read_text())
    steps = set(manifest["step_seconds"])
    assert {"language model", "vision side", "target VLM", "answers + teacher-forced data", "stage 1 (EAGLE)",
            "stage 2 (ViSpec)", "stage 1 continued (blind EAGLE)"} <= steps
    hashes = manifest["artifacts_sha256"]
    for path in (world.vispec_draft / "model.safetensors", world.eagle_draft / "model.safetensors",
                 world.target / "model.safetensors", world.paths.vision_weights):
        key = str(path.relative_to(world.paths.root))
        assert len(hashes[key]) == 64
    assert manifest["grounding"]["heldout_images"]["samples"] == PRESETS["tiny"].eval_samples
    assert manifest["grounding"]["heldout_images"]["dtype"] == manifest["preset"]["answer_dtype"]
    assert manifest["command"]


def test_drafts_have_equal_budget_and_the_right_structure(tiny_world):
    from vispec_vllm.draft import ViSpecDraft

    world, _, _ = tiny_world
    vispec = ViSpecDraft.from_pretrained(world.vispec_draft, dtype=torch.float32)
    blind = ViSpecDraft.from_pretrained(world.eagle_draft, dtype=torch.float32)
    assert vispec.num_q == PRESETS["tiny"].num_q  # the image path
    assert blind.num_q is None  # vision-blind: no adaptor
    assert torch.equal(vispec.d2t, blind.d2t)  # the same reduced vocabulary, chosen once in stage 1
    runs = world.paths.root / "runs"
    logs = {name: [json.loads(line) for line in (runs / name / "train_log.jsonl").read_text().splitlines()]
            for name in ("stage1", "vispec", "eagle")}
    preset = PRESETS["tiny"]
    assert logs["vispec"][-1]["step"] == logs["eagle"][-1]["step"] == preset.draft_stage2_steps
    # the same schedule for both continuations, at the stage-2 rate; stage 1 at its own
    assert [r["lr"] for r in logs["vispec"]] == [r["lr"] for r in logs["eagle"]]
    assert max(r["lr"] for r in logs["vispec"]) == pytest.approx(preset.draft_stage2_lr)
    assert max(r["lr"] for r in logs["stage1"]) == pytest.approx(preset.draft_lr)
    # stage 2 trains every position of the served chain: 1 + draft_mtp_steps passes; the blind draft one
    assert len(logs["vispec"][-1]["acc_passes"]) == 1 + preset.draft_mtp_steps
    assert len(logs["eagle"][-1]["acc_passes"]) == 1


def test_the_target_reads_the_image_and_a_second_build_is_all_cached(tiny_world, tmp_path):
    world, lm, _ = tiny_world
    config = json.loads((world.target / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["text_config"]["hidden_size"] == lm.reference.config.hidden_size
    log: list[str] = []
    again = build_world(world.preset, world.paths.root.parent, lm_path=lm.gguf_path, progress=False,
                        log=log.append)
    cached = [line for line in log if line.endswith("cached")]
    assert len(cached) == 6, log  # every step but the LM check
    assert again.paths.manifest.exists()


def test_a_build_with_other_settings_refuses_the_cached_steps(tiny_world):
    world, lm, _ = tiny_world
    changed = dataclasses.replace(world.preset, draft_stage2_steps=world.preset.draft_stage2_steps + 1)
    before = world.paths.manifest.read_text()
    with pytest.raises(SystemExit, match=r"draft_stage2_steps 6 -> 7.*rm -r .*--from-scratch"):
        build_world(changed, world.paths.root.parent, lm_path=lm.gguf_path, progress=False, log=lambda _: None)
    assert world.paths.manifest.read_text() == before  # nothing touched
    assert (world.vispec_draft / "model.safetensors").exists()


def test_from_scratch_clears_the_cached_steps_and_records_the_settings(tmp_path):
    from vispec_vllm.world.build import WorldPaths, start_world

    paths = WorldPaths(tmp_path / "tiny")
    stale = paths.draft("vispec") / "model.safetensors"
    stale.parent.mkdir(parents=True)
    stale.write_text("stale")
    paths.manifest.write_text(json.dumps({"preset": {"name": "tiny", "vision_steps": 1}}))
    with pytest.raises(SystemExit, match="vision_steps 1 -> 4"):  # an older world: settings from its manifest
        start_world(paths, PRESETS["tiny"], from_scratch=False)
    assert stale.exists()
    start_world(paths, PRESETS["tiny"], from_scratch=True)
    assert not stale.exists() and not paths.manifest.exists()
    assert json.loads(paths.preset.read_text()) == PRESETS["tiny"].to_json()
    start_world(paths, PRESETS["tiny"], from_scratch=False)  # same settings: resumes
