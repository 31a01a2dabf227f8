"""W&B tracking runs offline without a key and records config, step metrics and a prediction table.

Run: pytest tests/test_tracking.py
"""

import json

from tests.conftest import make_trainer


def test_wandb_offline_run_records_config_metrics_and_predictions(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer = make_trainer(
        tmp_path, "logger=wandb", "logger.run_name=tiny", "logger.tags=[test]", "train.max_steps=2",
        "train.global_batch_size=4", "train.eval_table_rows=4",
    )  # fmt: skip
    trainer.fit()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # Offline runs keep config and metrics in the run's record log (synced later by `wandb sync`).
    records = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in ["global_batch_size", "vit_tiny", "loss", "grad_norm", "lr/lm", "tokens_per_s", "step_time_s",
                "data_wait_fraction", "peak_memory_bytes", "val_accuracy", "val_loss", "data_skipped_draws", "val/predictions"]:  # fmt: skip
        assert key.encode() in records, key
    files = runs[0] / "files"
    tables = list((files / "media" / "table" / "val").glob("predictions_*.table.json"))
    table = json.loads(tables[0].read_text())
    assert table["columns"][:3] == ["index", "kind", "question"] and len(table["data"]) == 4
    assert len(list((files / "media" / "images").rglob("*.png"))) == 4  # the images went with the predictions
