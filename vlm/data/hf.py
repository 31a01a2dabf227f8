"""Hugging Face datasets (`data=hf`): anything `load_dataset` / `load_from_disk` opens, with a column mapping.

`data.dataset.path` is a directory written by `save_to_disk`, a local file (parquet, json/jsonl, arrow,
csv), a directory for a builder such as `imagefolder` (`data.dataset.builder`), or a hub name
(`HuggingFaceM4/the_cauldron` with `subset: vqav2`). Conversation layouts, by column:
`messages` ([{role, content}], content a string or [{type: image} | {type: text, text}] parts),
`texts` (the_cauldron: [{user, assistant}]), `conversations` (LLaVA: [{from, value}]), or
`question` + `answer`. Images: a list column (`images`) or a single one (`image`), as `datasets.Image`
features, bytes or paths. Columns are found by those names unless `data.dataset.columns` maps them.
Image features are read undecoded, so a corrupt image is one counted bad sample, not a crash inside
`datasets`.
"""

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from vlm.config import ConfigError
from vlm.data.bad_samples import BadSample
from vlm.data.conversation import IMAGE, llava_turns, place_images, role_of, text_of
from vlm.data.records import RecordDataset, RecordsConfig, holdout_split
from vlm.data.streaming import IterableSource

if TYPE_CHECKING:  # imported where used: half a second at start-up that every process paid, HF data or not
    import datasets

BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".arrow": "arrow", ".csv": "csv"}
LAYOUTS = ("messages", "texts", "conversations", "question")


@dataclass
class HFColumns:
    """Column names; null: a column with the field's own name is used when the dataset has one."""

    images: str | None = None  # list of images
    image: str | None = None  # one image
    messages: str | None = None
    texts: str | None = None
    conversations: str | None = None
    question: str | None = None
    answer: str | None = None
    id: str | None = None
    kind: str | None = None


@dataclass
class HFConfig(RecordsConfig):
    name: str = "hf"
    builder: str | None = None  # parquet | json | arrow | csv | imagefolder | ...; null: from the file suffix
    subset: str | None = None  # the dataset's configuration name (the_cauldron: vqav2, ...)
    split: str = "train"
    val_split: str | None = None  # a split of the same dataset for validation; null: hold out val_fraction
    image_marker: str = "<image>"
    columns: HFColumns = field(default_factory=HFColumns)


def open_split(cfg: HFConfig, split: str, streaming: bool = False) -> "datasets.Dataset | datasets.IterableDataset":
    """`streaming`: an IterableDataset read as it goes (files and hub datasets are never loaded whole)."""
    import datasets

    path = Path(cfg.path)
    saved = path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))
    if saved:
        dataset = datasets.load_from_disk(str(path))
        dataset = dataset[split] if isinstance(dataset, datasets.DatasetDict) else dataset
        return dataset.to_iterable_dataset(num_shards=1) if streaming else dataset  # memory-mapped already
    if path.is_file():
        builder = cfg.builder or BUILDERS.get(path.suffix)
        if builder is None:
            raise ConfigError(f"data.dataset.path={cfg.path!r}: set data.dataset.builder for a {path.suffix} file")
        return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=streaming)
    if cfg.builder:
        return datasets.load_dataset(cfg.builder, data_dir=str(path), split=split, streaming=streaming)
    return datasets.load_dataset(cfg.path, name=cfg.subset, split=split, streaming=streaming)  # a hub name


def default_image_root(cfg: HFConfig) -> Path | None:
    """`image_root`, else the local dataset's folder; a hub dataset (images as bytes) has none: paths are refused."""
    if cfg.image_root:
        return Path(cfg.image_root)
    local = Path(cfg.path)
    if not local.exists():
        return None
    return local if local.is_dir() else local.parent


def resolve_columns(dataset: "datasets.Dataset", wanted: HFColumns) -> HFColumns:
    """Mapped names checked, unmapped ones found by their default name; exactly one conversation layout."""
    names = set(dataset.column_names)
    resolved = HFColumns()
    for f in fields(HFColumns):
        given = getattr(wanted, f.name)
        if given is not None and given not in names:
            raise ConfigError(f"data.dataset.columns.{f.name}={given!r} is not a column; the dataset has "
                             f"{sorted(names)}. See TROUBLESHOOTING.md#hf-column-mapping.")  # fmt: skip
        setattr(resolved, f.name, given if given is not None else (f.name if f.name in names else None))
    layouts = [name for name in LAYOUTS if getattr(resolved, name)]
    if len(layouts) != 1 or (layouts == ["question"] and not resolved.answer):
        raise ConfigError(
            f"cannot tell the conversation layout from the columns {sorted(names)} (found: {layouts or 'none'}). Map "
            "exactly one of data.dataset.columns.messages / texts / conversations / question (+ answer). "
            "See TROUBLESHOOTING.md#hf-column-mapping."
        )
    return resolved


def undecoded(dataset: "datasets.Dataset", columns: HFColumns) -> "datasets.Dataset":
    """Image features read as {bytes, path}: we decode, so a corrupt image becomes a counted bad sample."""
    import datasets

    for name in (columns.images, columns.image):
        feature = dataset.features.get(name) if name else None
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feature, (datasets.List, datasets.Sequence)) and isinstance(feature.feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.List(datasets.Image(decode=False)))
    return dataset


class HFDataset(RecordDataset):
    def __init__(self, cfg: HFConfig, split: str, image_size: int):
        self.marker = cfg.image_marker
        if cfg.streaming and not cfg.val_split:
            raise ConfigError(
                "data.dataset.streaming=true needs data.dataset.val_split: a stream is never held out from"
            )
        own_split = split == "train" or not cfg.val_split
        streamed = cfg.streaming and split == "train"
        dataset = open_split(cfg, cfg.split if own_split else cfg.val_split, streamed)
        self.columns = resolve_columns(dataset, cfg.columns)
        dataset = undecoded(dataset, self.columns)
        if streamed:
            self.stream = IterableSource(dataset)
            super().__init__([], [], default_image_root(cfg))
            return
        positions = (
            list(range(len(dataset)))
            if cfg.val_split
            else holdout_split(len(dataset), cfg.val_fraction, cfg.seed, split)
        )
        super().__init__(dataset, positions, default_image_root(cfg), cfg.max_val_samples if split != "train" else None)

    def to_raw(self, record: dict, label: str) -> dict:
        c = self.columns
        images = record[c.images] if c.images else [record[c.image]] if c.image and record[c.image] is not None else []
        images = [self._source(image, label) for image in (images or [])]
        messages, order = place_images(self._turns(record, label), len(images), self.marker, label)
        raw = {"images": [images[k] for k in order], "messages": messages}
        if c.kind and record[c.kind] is not None:
            raw["kind"] = str(record[c.kind])
        return raw

    def _turns(self, record: dict, label: str) -> list[tuple[str, list]]:
        c = self.columns
        if c.question:
            return [("user", [text_of(record[c.question], "question", label)]),
                    ("assistant", [text_of(record[c.answer], "answer", label)])]  # fmt: skip
        if c.conversations:
            return llava_turns(record[c.conversations], label)
        if c.texts:
            turns = []
            for k, pair in enumerate(record[c.texts]):
                turns.append(("user", [text_of(pair.get("user"), f"texts[{k}].user", label)]))
                turns.append(("assistant", [text_of(pair.get("assistant"), f"texts[{k}].assistant", label)]))
            return turns
        return [(role_of(m.get("role"), label), self._parts(m.get("content"), label)) for m in record[c.messages]]

    @staticmethod
    def _parts(content, label: str) -> list:
        if isinstance(content, str):
            return [content]
        if not isinstance(content, list):
            raise BadSample("malformed_record", f"message content is {content!r}", label)
        return [IMAGE if p.get("type") == "image" else text_of(p.get("text"), "a text part", label) for p in content]

    def _source(self, image, label: str):
        """Bytes and decoded images as they are; paths (strings, or path-only image features) inside the root."""
        if isinstance(image, dict) and not image.get("bytes"):
            image = image.get("path")
        return self.image_path(image, label) if isinstance(image, str) else image
