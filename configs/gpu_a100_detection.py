"""COCO 2017 object detection (`<OD>`) on one A100-40GB: Florence-2-base-ft, scored by COCO mAP.

Data: the standard COCO layout, `annotations/instances_{train,val}2017.json` with the images in `train2017/`
and `val2017/` (paths below are relative to the working directory; override `data.source`,
`data.image_root`, `data.eval_source`, `data.eval_image_root`). Each image is one example: prompt `<OD>`,
target `label<loc_x1><loc_y1><loc_x2><loc_y2>...` for every non-crowd box in raster order, coordinates in
Florence-2's 1000 bins relative to the image's width and height. Crowd regions are ignore regions in the
evaluation, as in COCO.

Evaluation: beam 3 generation up to 256 tokens, decoded into boxes and scored with COCO mAP@[.5:.95]
(also mAP@.5, mAP@.75 and per-class AP in eval.jsonl); the best checkpoint is kept by mAP. Florence-2 emits
no confidences, so every box scores 1.0: the AP is that of one operating point, lower than a detector's
with ranked scores.

Lengths: COCO has 7.3 boxes per image on average and a long tail; a box costs 4 location tokens plus 1-3
label tokens, so 256 target tokens hold ~40 boxes (longer targets are cut, keeping `</s>`, and counted as
truncated_target). Learning rate 5e-6 (the usual Florence-2 detection fine-tuning rate; the DocVQA recipe's
1e-6 moves the location head too slowly), linear decay with a short warmup, vision tower frozen as in
`gpu_a100.py`.

Memory: the DocVQA step at batch 32 (64 target tokens) needed 35.7 of 40 GiB by the CPU compiler's check (26.9
since 7f1962d unrolled the GPU's vision stages); 256
target tokens add about 2.5 GiB of float32 logits and their gradient (32 x 256 x 51k x 4 bytes, twice). So the
global batch 32 runs as 2 micro-batches of 16 (`grad_accum_steps=2`, same update). XLA:GPU's own compile of
this config for an A100-40GB (`python -m scripts.aot_compile --config gpu_a100_detection.py --topology a100`,
no GPU needed; docs/scale-out.md, 2026-12-07, at 21d7994): 8.5 GiB.
"""

import dataclasses

from configs import gpu_a100
from train.config import MixtureComponent


def get_config():
    cfg = gpu_a100.get_config()
    coco = MixtureComponent(
        source="coco/annotations/instances_train2017.json",
        image_root="coco/train2017",
        eval_source="coco/annotations/instances_val2017.json",
        eval_image_root="coco/val2017",
        format="coco",
        template="od",
        metric="map",  # COCO box mAP of the decoded generations
    )
    return dataclasses.replace(
        cfg,
        num_epochs=3,
        grad_accum_steps=2,
        checkpoint_every_steps=1000,
        data=dataclasses.replace(
            cfg.data,
            mixture=(coco,),
            max_prompt_tokens=16,  # "Locate the objects with category name in the image."
            max_target_tokens=256,
        ),
        optim=dataclasses.replace(cfg.optim, learning_rate=5e-6, warmup_steps=200),
        eval=dataclasses.replace(cfg.eval, max_new_tokens=256),
    )
