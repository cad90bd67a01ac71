"""Labelling at scale: ``python -m florence_jax.label INPUT --out DIR --model M --task T [--task T2 ...]``.

::

    python -m florence_jax.label photos/ --out labels/ --model florence-community/Florence-2-large --task "<OD>"
    python -m florence_jax.label data/train.parquet --out caps/ --model M --task "<CAPTION>" --task "<OCR>"
    python -m florence_jax.label questions.jsonl --out answers/ --model M --task "<DocVQA>" --text_column question
    python -m florence_jax.label boxes.json --out names/ --model M --task "<REGION_TO_CATEGORY>"

* Input (:mod:`florence_jax.label.inputs`): a folder or glob of images, parquet/arrow files, a ``save_to_disk``
  folder, a JSONL file of image paths, a Hub dataset id or a COCO JSON (region tasks: one item per annotation).
* Compute (:mod:`florence_jax.label.engine`, :mod:`florence_jax.label.run`): images decoded and resized in grain
  workers; batches split over every local device, each running the single-device program; the vision tower once
  per image for all tasks; one compiled program per prompt-length bucket; under ``jax.distributed`` (or
  ``--process_index/--process_count``) each process labels its own shards.
* Output (:mod:`florence_jax.label.output`): shards written atomically with a manifest, so a rerun of the same
  command continues; ``labels.jsonl`` with one line per item (the post-processed result, or the reason the item
  could not be labelled); a COCO JSON per box task (every score 1.0: Florence-2 gives no confidences).
"""
