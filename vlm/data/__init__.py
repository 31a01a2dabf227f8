"""Data: from a record on disk to the encoded samples of a step. Knows nothing of models, training or composition.

The stages, each its own file: source (formats.py: the dataset contract, the registry of formats and the `data`
config; one file per format: llava.py, hf.py, shapes.py; records.py, streaming.py) -> processing (processing.py, with
chat_format.py, conversation.py, images.py, tokenizer.py; a record it cannot use is a BadSample, counted by
bad_samples.py) -> transfer (transfer.py: worker to trainer, host to device) -> packing (packing.py) -> collation
(collate.py). A new data format is one file registered in formats.DATASETS.
"""
