"""3D parallelism: tensor-parallel layers, the pipeline, topology and weight conversion.

`config` validates a layout without touching devices; `tensor` holds the tensor-parallel
primitives; `layers` the model as pipeline stages; `pipeline` the DeepSpeed `PipelineModule`;
`topology` the process placement; `convert` maps weights to and from the plain `GPTNeoX`.
"""

from neoray.parallel.config import ParallelConfig, validate_layout

__all__ = ["ParallelConfig", "validate_layout"]
