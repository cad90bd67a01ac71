"""Detection on CPU: the shipped tiny reader learns `<OD>` on synthetic shapes, scored by COCO mAP.

No network, no download. The data (`train/data/synthetic_detection.py`) is written as a COCO JSON + PNGs into
the workdir and read back through the same path as real COCO data: `CocoRecords`, the `od` template
(`label<loc_x1><loc_y1><loc_x2><loc_y2>...` with Florence-2's 1000-bin quantization), box decoding with
`florence_jax.postprocess` and `train.metrics.coco_map`. Three classes (red circle, blue square, green
triangle), 1-3 non-overlapping objects per 64x64 image, box edges on a 4x4 grid of 16 px cells.

It starts from the pretrained reader the document demo uses (`florence_jax/assets/tiny_reader`, which saw
boxes of bands, shapes and words in its `<OD>` pretraining, never these classes) and trains every parameter.
Measured runs, and the from-scratch design it replaces, are in docs/benchmarks.md.
"""

import dataclasses

from configs import cpu_demo
from train.config import MixtureComponent


def get_config():
    cfg = cpu_demo.get_config()
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(
            cfg.data,
            # COCO box mAP of the decoded generations
            mixture=(MixtureComponent(source="synthetic_detection", template="od", metric="map"),),
            synthetic=dataclasses.replace(cfg.data.synthetic, num_train=3200),
            max_target_tokens=32,  # 3 objects of up to 5 label tokens + 4 locations, plus <s> and </s>
        ),
        optim=dataclasses.replace(cfg.optim, freeze=()),  # everything trains: the reader never saw these classes
        eval=dataclasses.replace(cfg.eval, max_new_tokens=32, num_print=3),
    )
