"""3D parallelism: the pipeline, topology and weight conversion.

`config` validates a layout without touching devices; `pipeline` makes the model's layers
(built with a tensor-parallel group: `neoray.model.tensor_parallel`) the stages of a DeepSpeed
`PipelineModule`; `topology` the process placement; `convert` maps weights to and from the
plain `GPTNeoX`.
"""
