"""Text-classification data: TSV, CSV or JSON lines files with or without a header, columns by name
or index, integer or string labels mapped to ids, a bundled SST-2 sample, and seeded shuffling."""

from gradkit.data.text import (
    TextClassificationData,
    bundled_sst2,
    load_label_map,
    load_text_classification,
    save_label_map,
    shuffled_order,
)

__all__ = [
    "TextClassificationData",
    "bundled_sst2",
    "load_label_map",
    "load_text_classification",
    "save_label_map",
    "shuffled_order",
]
