"""3D parallelism: tensor-parallel primitives, the pipeline, topology and weight conversion.

`config` validates a layout without touching devices; `tensor` holds the tensor-parallel
primitives that the model's own layers are built from (`neoray.model.gpt_neox`); `pipeline`
makes those layers the stages of a DeepSpeed `PipelineModule`; `topology` the process
placement; `convert` maps weights to and from the plain `GPTNeoX`. Nothing is imported here:
`tensor` sits below the model, `config` and `pipeline` above it.
"""
