"""The engine: the only package that imports torch (and transformers, peft). One thread runs every generation,
sharing each forward pass among the requests in flight (engine_loop), over a preallocated KV cache (kv_cache), with
CUDA graphs for the decode step (cuda_graphs), sampling on the device (sampler) and text made on a thread of its own
(detokenizer). model_loading reads the model and its adapter."""
