"""The served model as code (MLflow "models from code"): `serving.log_pyfunc_model` logs this file.

Loading the logged model runs this file (with the model's own copy of `hdmap_ad` on the path)
instead of unpickling a Python object; the weights come from the model's checkpoint artifact,
a safetensors file. See hdmap_ad.pipeline.serving for inputs and outputs.
"""

import mlflow.models

from hdmap_ad.pipeline.serving import HdmapPyfuncModel

mlflow.models.set_model(HdmapPyfuncModel())
