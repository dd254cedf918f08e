"""torch -> ONNX (-> TensorRT) device bundles. Imports sglora_edge; the runtime never imports this package."""

from .bundle import BUNDLE_FORMAT_VERSION, BundleExportError, export_bundle

__all__ = ["BUNDLE_FORMAT_VERSION", "BundleExportError", "export_bundle"]
