"""Bring your own data: LLaVA JSON/JSONL and HF datasets, bad records skipped and counted, unusual ones trained.

Run: pytest tests/test_data.py
"""

import json
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import vlm.data.images as images_module
from tests.conftest import compose_config, new_trainer
from tests.corpus import EXPECTED_SKIPS, NUM_RECORDS
from tests.test_resume import StopAfter, losses
from vlm.check_data import main as check_main
from vlm.data.bad_samples import BadSample, SkippedSample, TooManyBadSamplesError
from vlm.data.collate import Collator
from vlm.data.formats import EncodedDataset
from vlm.data.hf import HFConfig, HFDataset
from vlm.data.images import ImageSplittingConfig, load_image
from vlm.data.llava import LlavaConfig, LlavaDataset
from vlm.data.processing import SampleProcessor
from vlm.data.records import holdout_split
from vlm.training.trainer import Trainer

# Reason of each bad record of tests/corpus.py, by id (what the skip counts must be made of).
BAD_IDS = {
    "image_missing": {"missing"}, "image_empty": {"empty"}, "image_truncated": {"truncated"},
    "image_not_an_image": {"not-an-image"}, "image_too_large": {"bomb"},
    "image_outside_root": {"outside-relative", "outside-absolute", "outside-symlink"},
    "marker_mismatch": {"too-many-markers"}, "nothing_to_learn": {"no-answer", "empty-answer"},
    "malformed_record": {"unknown-role", "missing-value"}, "truncation_cuts_image": {"cut-image"},
    "answer_truncated": {"cut-answer"},
}  # fmt: skip


def corpus_overrides(corpus: Path, *extra: str, fmt: str = "llava") -> list[str]:
    path = corpus / ("hf" if fmt == "hf" else "data.json")
    return [f"data={fmt}", f"data.dataset.path={path}", f"data.dataset.image_root={corpus / 'images'}", *extra]


def corpus_trainer(run_dir: Path, corpus: Path, *overrides: str, fmt: str = "llava", trainer_class=Trainer):
    val = ["data.dataset.val_path=" + str(corpus / "val.json")] if fmt == "llava" else []
    data = corpus_overrides(corpus, *val, fmt=fmt)
    cfg = compose_config("train.eval_every=0", "train.log_every=1", "train.warmup_steps=0", "train.max_new_tokens=4",
                         "data.max_length=256", *overrides, experiment="llava_tiny", data=data)  # fmt: skip
    return new_trainer(cfg, run_dir, trainer_class)


def skipped_ids(trainer) -> dict[str, set[str]]:
    return {
        reason: {label.split("id '")[1].rstrip("')") for label in seen.values()}
        for reason, seen in trainer.data_skips.bad.items()
    }


def test_llava_corpus_trains_with_exactly_the_expected_skips(corpus_dir, tmp_path):
    """One epoch over all 40 records: every bad one counted once under its reason, the run completes."""
    trainer = corpus_trainer(tmp_path, corpus_dir, "train.global_batch_size=8", "train.max_steps=10",
                             "data.max_skip_fraction=1.0")  # fmt: skip
    assert len(trainer.parts.train_set) == NUM_RECORDS
    metrics = trainer.fit()  # two epochs: every bad sample drawn twice, counted once
    assert metrics["data_skipped"] == EXPECTED_SKIPS
    assert skipped_ids(trainer) == BAD_IDS
    assert trainer.data_skips.bad_draws == 2 * sum(EXPECTED_SKIPS.values())
    assert np.isfinite(metrics["final_train_loss"]) and np.isfinite(metrics["val_loss"])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["data_skipped"] == EXPECTED_SKIPS


def test_skips_do_not_depend_on_the_micro_batch_size(corpus_dir, tmp_path):
    """Same samples skipped, same per-step losses, whole share vs micro-batches of 3 (ViT: no BatchNorm)."""
    runs = {}
    for micro in ("null", "3"):
        trainer = corpus_trainer(tmp_path / micro, corpus_dir, "train.global_batch_size=8", "train.max_steps=5",
                                 f"train.micro_batch_size={micro}", "data.max_skip_fraction=1.0")  # fmt: skip
        losses = []
        for samples in trainer.batches():
            losses.append(trainer.train_step(samples)["loss"])
            if trainer.step == 5:
                break
        runs[micro] = (losses, trainer.data_skips.counts())
    assert runs["null"][1] == runs["3"][1] == EXPECTED_SKIPS
    assert runs["null"][0] == pytest.approx(runs["3"][0], rel=1e-5)


def test_hf_dataset_of_the_same_records_skips_the_same(corpus_dir, tmp_path):
    """save_to_disk dataset, paths column: train + validation counts together are the whole corpus's."""
    trainer = corpus_trainer(tmp_path, corpus_dir, "train.global_batch_size=19", "train.max_steps=2",
                             "data.max_skip_fraction=1.0", fmt="hf")  # fmt: skip
    assert len(trainer.parts.train_set) + len(trainer.parts.val_set) == NUM_RECORDS
    metrics = trainer.fit()
    reasons = set(metrics["data_skipped"]) | set(metrics["val_skipped"])
    total = {r: metrics["data_skipped"].get(r, 0) + metrics["val_skipped"].get(r, 0) for r in reasons}
    assert total == EXPECTED_SKIPS


def test_on_error_raise_stops_naming_the_sample(corpus_dir, tmp_path):
    trainer = corpus_trainer(
        tmp_path, corpus_dir, "train.global_batch_size=8", "train.max_steps=5", "data.on_error=raise"
    )
    with pytest.raises(BadSample, match=r"sample \d+ \(id '[a-z-]+'\): .*\[\w+\]\. See TROUBLESHOOTING\.md#"):
        trainer.fit()


def test_too_many_bad_samples_stop_the_run_listing_the_counts(corpus_dir, tmp_path):
    trainer = corpus_trainer(
        tmp_path, corpus_dir, "train.global_batch_size=8", "train.max_steps=5", "data.skip_check_after=16"
    )
    with pytest.raises(
        TooManyBadSamplesError, match=r"of the 16 samples drawn so far were bad.*image_\w+: 1 \(samples"
    ):
        trainer.fit()


def test_jsonl_line_that_is_not_json_is_one_bad_record(corpus_dir):
    cfg = LlavaConfig(path=str(corpus_dir / "data.jsonl"), image_root=str(corpus_dir / "images"), val_fraction=0.0)
    dataset = LlavaDataset(cfg, "train", 32)
    assert len(dataset) == NUM_RECORDS + 1
    with pytest.raises(BadSample, match=r"record 5'\): line 6 is not valid JSON .*\[malformed_record\]"):
        dataset[5]


def test_a_path_outside_the_image_root_is_never_opened(corpus_dir, tiny, monkeypatch):
    opened = []
    real_open = images_module.Image.open
    monkeypatch.setattr(
        images_module.Image,
        "open",
        lambda fp, *a, **k: opened.append(Path(fp.name).resolve()) or real_open(fp, *a, **k),
    )
    cfg = LlavaConfig(path=str(corpus_dir / "data.json"), image_root=str(corpus_dir / "images"), val_fraction=0.0)
    encoded = EncodedDataset(LlavaDataset(cfg, "train", 32), tiny.processor)
    outside = [
        s
        for s in map(encoded.__getitem__, range(len(encoded)))
        if isinstance(s, SkippedSample) and s.reason == "image_outside_root"
    ]
    assert len(outside) == 3 and opened
    assert not [p for p in opened if not p.is_relative_to((corpus_dir / "images").resolve())]


def test_unusual_images_become_the_right_rgb(corpus_dir):
    images = corpus_dir / "images"
    pixel = lambda name: np.asarray(load_image(images / name, "t"))[0, 0].tolist()  # noqa: E731
    assert pixel("gray.png") == [90, 90, 90]
    r, g, b = pixel("cmyk.jpg")
    assert r > 200 and g < 60 and b < 60
    assert pixel("sixteen.png") == [128, 128, 128]  # 16-bit mid grey scaled, not clipped to white
    assert pixel("rgba.png") == [255, 255, 255]  # transparent over white, not over black
    assert pixel("palette.png") == [255, 0, 0]
    assert load_image(images / "exif.jpg", "t").size == (20, 60)  # EXIF orientation applied
    for name in ("la.png", "tiny.png", "wide.png"):
        assert load_image(images / name, "t").mode == "RGB"


def test_unmarked_images_go_first_in_the_first_user_turn_in_order(corpus_dir):
    cfg = LlavaConfig(path=str(corpus_dir / "data.json"), image_root=str(corpus_dir / "images"), val_fraction=0.0)
    dataset = LlavaDataset(cfg, "train", 32)
    by_id = {dataset[i]["id"]: dataset[i] for i in range(19)}
    partial = by_id["multi-partial"]  # images [rgb2, rgb3, gray], one marker (for rgb2) in the middle of the text
    assert [p.name for p in partial["images"]] == ["rgb3.png", "gray.png", "rgb2.png"]
    assert partial["messages"][0]["content"] == [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare "}, {"type": "image"},
        {"type": "text", "text": " with the rest."},
    ]  # fmt: skip
    assert by_id["good-no-marker"]["messages"][0]["content"][0] == {"type": "image"}
    assert (
        by_id["text-only"]["images"] == [] and by_id["text-only"]["messages"][0]["content"] == "What is two plus two?"
    )
    assert by_id["system"]["messages"][0] == {"role": "system", "content": "Be brief."}


def test_multi_image_and_text_only_samples_merge_at_their_own_placeholders(tiny):
    """Each image's features land on its own run, in order, whatever else shares the batch."""
    rng = np.random.default_rng(0)
    image = lambda: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # noqa: E731
    two = {"images": [image(), image()], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "vs"}, {"type": "image"}]},
        {"role": "assistant", "content": "same"}]}  # fmt: skip
    text = {"images": [], "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    one = {
        "images": [image()],
        "messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}],
    }
    model, processor = tiny.model.eval(), tiny.processor
    samples = [processor(s, i) for i, s in enumerate([two, text, one])]
    batch = Collator(tiny.tokenizer.pad_token_id)(samples)
    assert batch["image_counts"] == [2, 0, 1]
    with torch.no_grad():
        merged = model.embed(batch["input_ids"], batch["pixel_values"])
        per_image = [
            model.projector(model.vision(s.pixel_values[k : k + 1]))[0]
            for s in samples
            for k in range(len(s.pixel_values))
        ]
    runs = [merged[row][batch["input_ids"][row] == model.token_ids.image] for row in range(3)]
    runs = [run.view(-1, model.tokens_per_image, run.shape[-1]) for run in runs]
    assert torch.allclose(torch.cat([r for r in runs if len(r)]), torch.stack(per_image), atol=1e-6)
    text_only = Collator(tiny.tokenizer.pad_token_id)([samples[1]])
    assert text_only["pixel_values"].shape[0] == 0
    assert torch.isfinite(model(text_only).loss_sum)


def test_image_splitting_gives_tiles_with_positions_and_a_global_view(tiny, corpus_dir):
    base = tiny.processor
    processor = SampleProcessor(base.chat_format, base.image_transform, 512, tiny.model.token_ids.image,
                                tiny.model.tokens_per_image, ImageSplittingConfig(enabled=True, max_tiles=4))  # fmt: skip
    Image.new("RGB", (128, 32)).save(corpus_dir / "images" / "wide4.png")  # 4 tiles wide at 32 px
    wide = {"images": [str(corpus_dir / "images" / "wide4.png")], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}, {"role": "assistant", "content": "x"}]}  # fmt: skip
    sample = processor(wide, 0)
    assert sample.pixel_values.shape[0] == 5  # 1 x 4 tiles + the global view
    ids = sample.input_ids
    assert int((ids == tiny.model.token_ids.image).sum()) == 5 * tiny.model.tokens_per_image
    text = tiny.tokenizer.decode(ids)
    assert "<row_1_col_1>" in text and "<row_1_col_4>" in text and "<global_img>" in text
    assert tiny.tokenizer.decode(ids[sample.labels != -100]) == "x<|im_end|>"  # layout text is never supervised
    assert processor({**wide, "images": [str(corpus_dir / "images" / "tiny.png")]}, 1).pixel_values.shape[0] == 1
    batch = Collator(tiny.tokenizer.pad_token_id)([sample])
    assert torch.isfinite(tiny.model(batch).loss_sum)


def test_holdout_split_is_seeded_disjoint_and_complete():
    train, val = holdout_split(100, 0.1, 3, "train"), holdout_split(100, 0.1, 3, "val")
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == list(range(100))
    assert val == holdout_split(100, 0.1, 3, "val") != holdout_split(100, 0.1, 4, "val")


def _png_bytes(colour) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, "PNG")
    return buffer.getvalue()


def test_hf_layouts_messages_texts_and_question_answer(tmp_path, tiny):
    """Image features (bytes, one corrupt) with messages parts; the_cauldron texts; question/answer parquet."""
    feature = datasets.Features({"images": datasets.List(datasets.Image()), "messages": [{"role": datasets.Value("string"),
                                 "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}]})  # fmt: skip
    messages = [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]  # fmt: skip
    rows = {"images": [[{"bytes": _png_bytes((255, 0, 0)), "path": None}], [{"bytes": b"\x89PNG broken", "path": None}]],
            "messages": [messages, messages]}  # fmt: skip
    datasets.Dataset.from_dict(rows, features=feature).save_to_disk(str(tmp_path / "msgs"))
    dataset = HFDataset(HFConfig(path=str(tmp_path / "msgs"), val_fraction=0.0), "train", 32)
    assert dataset[0]["messages"][0]["content"][0] == {"type": "image"}
    encoded = EncodedDataset(dataset, tiny.processor)
    assert encoded[0].pixel_values.shape[0] == 1 and isinstance(encoded[1], SkippedSample)
    assert encoded[1].reason in ("image_truncated", "image_not_an_image")

    cauldron = {"images": [[{"bytes": _png_bytes((0, 0, 255)), "path": None}]],
                "texts": [[{"user": "Colour?", "assistant": "blue", "source": "x"}, {"user": "Sure?", "assistant": "yes", "source": "x"}]]}  # fmt: skip
    datasets.Dataset.from_dict(cauldron, features=datasets.Features({
        "images": datasets.List(datasets.Image()),
        "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string"), "source": datasets.Value("string")}]}),
    ).to_parquet(str(tmp_path / "cauldron.parquet"))  # fmt: skip
    raw = HFDataset(HFConfig(path=str(tmp_path / "cauldron.parquet"), val_fraction=0.0), "train", 32)[0]
    assert [m["role"] for m in raw["messages"]] == ["user", "assistant", "user", "assistant"]
    assert raw["messages"][0]["content"][0] == {"type": "image"} and raw["messages"][3]["content"] == "yes"

    datasets.Dataset.from_dict({"q": ["Why?"], "a": ["because"]}).to_json(str(tmp_path / "qa.jsonl"))
    qa = HFConfig(path=str(tmp_path / "qa.jsonl"), val_fraction=0.0)
    qa.columns.question, qa.columns.answer = "q", "a"
    raw = HFDataset(qa, "train", 32)[0]
    assert raw["images"] == [] and raw["messages"][1] == {"role": "assistant", "content": "because"}


def test_hf_without_a_recognisable_layout_names_the_columns(tmp_path):
    datasets.Dataset.from_dict({"prompt": ["a"], "reply": ["b"]}).save_to_disk(str(tmp_path / "odd"))
    with pytest.raises(
        ValueError, match=r"cannot tell the conversation layout.*\['prompt', 'reply'\].*hf-column-mapping"
    ):
        HFDataset(HFConfig(path=str(tmp_path / "odd")), "train", 32)


def test_check_command_reports_bad_records_and_exits_non_zero(corpus_dir, shapes_llava, capsys, caplog):
    common = ["+experiment=llava_tiny", "model.vision.image_size=32", "train.compile=off"]
    with caplog.at_level(logging.WARNING):
        assert (
            check_main(
                [*common, *corpus_overrides(corpus_dir), "data.dataset.val_path=" + str(corpus_dir / "val.json")]
            )
            == 1
        )
    out = capsys.readouterr().out
    assert f"train: {NUM_RECORDS} records, {sum(EXPECTED_SKIPS.values())} bad" in out
    assert (
        "image_outside_root: 3 (samples" in out
        and "tokens per sample: p50" in out
        and "images per sample: 0: 2, 1:" in out
    )
    assert check_main([*common, *shapes_llava]) == 0
    assert check_main([*common, "data.dataset.path=/nonexistent.json"]) == 2


def test_llava_tiny_lowers_its_validation_loss(shapes_llava, tmp_path):
    """The llava_tiny experiment on a LLaVA-format export of Shapes VQA: held-out loss falls, accuracy is scored."""
    cfg = compose_config("train.max_steps=40", "train.global_batch_size=16", "train.lr=3e-3", "train.warmup_steps=5",
                         "train.eval_every=0", experiment="llava_tiny", data=shapes_llava)  # fmt: skip
    trainer = new_trainer(cfg, tmp_path)
    before = trainer.evaluate(len(trainer.parts.val_set))
    metrics = trainer.fit()
    assert metrics["val_samples"] == len(trainer.parts.val_set) == 19 and metrics["data_skipped"] == {}
    assert metrics["val_loss"] < 0.7 * before.loss, (before.loss, metrics["val_loss"])
    assert metrics["val_accuracy_samples"] == 19 and set(metrics["val_accuracy_by_kind"]) <= {
        "colour",
        "shape",
        "count",
        "position",
    }


def test_resumed_run_keeps_the_skip_counts_and_losses(corpus_dir, tmp_path):
    """Stopped after step 3 (SIGTERM), resumed: the same bad-sample tally and losses as the run straight through."""
    run = ["train.global_batch_size=8", "train.max_steps=10", "data.max_skip_fraction=1.0", "train.best_metric=null"]
    straight = corpus_trainer(tmp_path / "straight", corpus_dir, *run)
    straight.fit()
    stopped = corpus_trainer(tmp_path / "resumed", corpus_dir, *run, trainer_class=StopAfter)
    stopped.fit()
    assert stopped.step == StopAfter.stop_at
    resumed = corpus_trainer(tmp_path / "resumed", corpus_dir, *run, "train.resume=auto")
    assert resumed.data_skips.state_dict() == stopped.data_skips.state_dict()  # restored from the checkpoint
    resumed.fit()
    assert resumed.data_skips.state_dict() == straight.data_skips.state_dict()
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


def test_an_image_path_is_loaded_and_resized_like_the_image_itself(tiny, corpus_dir):
    path = corpus_dir / "images" / "rgb0.png"  # 48 x 40 on disk; the encoder takes 32 x 32
    from_path = tiny.processor.image_transform(load_image(path, "t"))
    from_memory = tiny.processor.image_transform(Image.open(path).convert("RGB"))
    assert from_path.shape == (3, 32, 32) and torch.equal(from_path, from_memory)


def test_hf_imagefolder_with_question_answer_metadata(tmp_path):
    """`builder: imagefolder`: path-only image features, resolved inside the folder; metadata gives the turns."""
    (tmp_path / "train").mkdir()
    rows = []
    for i in range(3):
        Image.new("RGB", (16, 16), (80 * i, 0, 0)).save(tmp_path / "train" / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "question": "Colour?", "answer": f"red{i}"}))
    (tmp_path / "train" / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    dataset = HFDataset(HFConfig(path=str(tmp_path), builder="imagefolder", val_fraction=0.0), "train", 32)
    raws = sorted((dataset[i] for i in range(3)), key=lambda r: r["messages"][1]["content"])
    assert [r["messages"][1]["content"] for r in raws] == ["red0", "red1", "red2"]
    assert raws[2]["images"] == [(tmp_path / "train" / "2.png").resolve()]


def test_hf_validation_split_by_name(tmp_path):
    splits = {name: datasets.Dataset.from_dict({"question": [f"{name} {i}?" for i in range(n)], "answer": ["a"] * n})
              for name, n in (("train", 6), ("validation", 2))}  # fmt: skip
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    cfg = HFConfig(path=str(tmp_path / "dd"), val_split="validation")
    train, val = HFDataset(cfg, "train", 32), HFDataset(cfg, "val", 32)
    assert len(train) == 6 and len(val) == 2  # all training records train: none held out
    assert val[1]["messages"][0]["content"] == "validation 1?"


def test_validation_comes_from_the_val_path_file(shapes_llava, tmp_path, capsys):
    """data.dataset.val_path: every validation sample is a record of that file, and the training file keeps all of
    its records (nothing held out of it)."""
    train_path = Path(shapes_llava[0].split("=", 1)[1])
    records = json.loads(train_path.read_text())
    held_out = [{**record, "id": f"held-out-{i}"} for i, record in enumerate(records[:3])]
    (tmp_path / "val.json").write_text(json.dumps(held_out))
    data = [*shapes_llava[:2], f"data.dataset.val_path={tmp_path / 'val.json'}"]
    cfg = compose_config("train.max_steps=1", "train.global_batch_size=4", "train.eval_every=0",
                         experiment="llava_tiny", data=data)  # fmt: skip
    trainer = new_trainer(cfg, tmp_path / "run")
    val = trainer.parts.val_set
    assert [val[i]["id"] for i in range(len(val))] == ["held-out-0", "held-out-1", "held-out-2"]
    assert len(trainer.parts.train_set) == len(records)
    trainer.fit()
    predictions = (tmp_path / "run" / "val_predictions.jsonl").read_text().splitlines()
    assert {json.loads(p)["id"] for p in predictions} == {"held-out-0", "held-out-1", "held-out-2"}
    capsys.readouterr()
    assert check_main(["+experiment=llava_tiny", *data]) == 0
    out = capsys.readouterr().out
    assert f"train: {len(records)} records" in out and "val: 3 records" in out
