"""Offline training: catalogs → labels → Keras model → ONNX bundle. TensorFlow is imported only when training runs."""

__all__ = ["CatalogProduct", "LabelMap", "TrainerSettings", "build_label_map", "train"]


def __getattr__(name: str):
    if name == "CatalogProduct":
        from training.catalog import CatalogProduct

        return CatalogProduct
    if name in ("LabelMap", "build_label_map"):
        from training import labels

        return getattr(labels, name)
    if name == "TrainerSettings":
        from training.settings import TrainerSettings

        return TrainerSettings
    if name == "train":
        from training.train import train

        return train
    raise AttributeError(f"module 'training' has no attribute {name!r}")
