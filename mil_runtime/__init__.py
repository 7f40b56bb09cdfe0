"""milkit runtime: run exported MIL models with onnxruntime and numpy, without PyTorch.

    import mil_runtime
    runner = mil_runtime.load_model("abmil.onnx", device="auto")
    bag = mil_runtime.read_feature_file("slide.h5")
    prediction = runner.predict(bag.features, bag.grid_coords())
    print(prediction.predicted_name, prediction.class_probabilities, prediction.attention.shape)

onnxruntime is imported when a model is loaded, not when this package is imported.
"""

from mil_runtime import errors
from mil_runtime._version import __version__
from mil_runtime.features_io import FeatureFile, read_feature_file, write_feature_file
from mil_runtime.images import predict_images
from mil_runtime.model import MILRunner, Prediction, load_model



def run_cohort(*args, **kwargs):
    """mil_runtime.cohort.run_cohort (imported on first use): resumable runs of many inputs into one folder."""
    from mil_runtime.cohort.runner import run_cohort as run

    return run(*args, **kwargs)


__all__ = [
    "__version__",
    "run_cohort",
    "errors",
    "load_model",
    "predict_images",
    "MILRunner",
    "Prediction",
    "FeatureFile",
    "read_feature_file",
    "write_feature_file",
]
